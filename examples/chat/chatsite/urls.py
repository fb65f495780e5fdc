"""HTTP routes of the chat example (websocket routes are in chat/routing.py)."""

from chat import rooms, views
from django.urls import re_path

urlpatterns = [
    re_path(r"^$", views.index, name="index"),
    re_path(r"^healthz$", views.healthz, name="healthz"),
    re_path(
        rf"^rooms/(?P<room>{rooms.ROOM_PATTERN})/announce$",
        views.announce,
        name="announce",
    ),
    re_path(
        rf"^rooms/(?P<room>{rooms.ROOM_PATTERN})/jobs$",
        views.start_job,
        name="start-job",
    ),
]
