"""HTTP routes: the page, starting a job, and a job's result."""

from django.urls import path
from jobs import views

urlpatterns = [
    path("", views.index),
    path("jobs/", views.start),
    path("jobs/<str:job_id>/", views.result),
]
