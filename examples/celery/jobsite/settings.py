"""Settings for the dmb Celery example.

One segment serves both the Channels layer and Celery's broker: the same
``prefix`` in ``CHANNEL_LAYERS`` and in ``CELERY_BROKER_URL``.  Results go
to files (``file://``): no server, readable from every process of the site.

Environment variables:

``DMB_PREFIX``
    The segment's prefix (default ``"jobs"``).  Every process of one site
    uses the same; the tests set a unique one per test.
``JOBS_RESULTS_DIR``
    Where the result backend writes (default ``./results``).
``CELERY_BROKER_URL``, ``CELERY_RESULT_BACKEND``
    Override the broker and result backend (the tests shorten the broker's
    ``recover_interval``; ``rpc://`` also works with dmb).
``JOBS_BEAT_SECONDS``
    Period of the ``tick`` task that ``celery beat`` schedules (default 10).
``JOBS_STEP_SECONDS``
    Pause between two steps of a job (default 0.5).
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# A fixed development key keeps the example runnable with no set-up; a real
# deployment must set DJANGO_SECRET_KEY.
SECRET_KEY = os.environ.get(
    "DJANGO_SECRET_KEY", "dev-only-insecure-key-for-the-dmb-celery-example"
)
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = ["channels", "jobs"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "jobsite.urls"
ASGI_APPLICATION = "jobsite.asgi.application"
DATABASES = {}  # no models: jobs live in Celery, results in files
TEMPLATES = []
USE_TZ = True

PREFIX = os.environ.get("DMB_PREFIX", "jobs")
RESULTS_DIR = Path(os.environ.get("JOBS_RESULTS_DIR", BASE_DIR / "results"))
RESULTS_DIR.mkdir(parents=True, exist_ok=True)

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "dmb.SharedMemoryChannelLayer",
        "CONFIG": {"prefix": PREFIX},
    }
}

# Celery, on the same segment.  acks_late: a task is acknowledged when it
# has run, so a worker killed mid-task leaves it to another worker; with a
# prefetch of one, a worker holds no more than it runs.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", f"dmb://{PREFIX}")
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", f"file://{RESULTS_DIR}")
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TRACK_STARTED = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE = {
    "tick": {
        "task": "jobs.tasks.tick",
        "schedule": float(os.environ.get("JOBS_BEAT_SECONDS", "10")),
    }
}
CELERY_BEAT_SCHEDULE_FILENAME = str(RESULTS_DIR / "celerybeat-schedule")

JOBS_STEP_SECONDS = float(os.environ.get("JOBS_STEP_SECONDS", "0.5"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "dmb": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "jobs": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
