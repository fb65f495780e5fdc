"""The Celery app: ``celery -A jobsite worker`` and ``celery -A jobsite beat``.

Its settings are Django's ``CELERY_*`` settings (jobsite/settings.py).  The
broker is the dmb segment the Channels layer uses: importing dmb.kombu
teaches kombu the ``dmb://`` scheme.
"""

import os

import dmb.kombu  # noqa: F401  (registers dmb://)
from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "jobsite.settings")

app = Celery("jobsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
