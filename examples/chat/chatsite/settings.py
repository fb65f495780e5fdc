"""Settings for the dmb chat example.

The example is meant to be run on one host by several server processes at
once (uvicorn or gunicorn workers, daphne, ``manage.py runworker``). They
all read these settings, so everything that must agree between them (the
channel layer's prefix above all) comes from the environment, not from
per-process state.

Environment variables:

``DMB_PREFIX``
    The channel layer prefix (default ``"chat"``). Every process of one site
    must use the same value; two sites on one host must use different ones.
    The test-suite sets a unique value per test so runs never share a
    segment.
``DMB_SIZE``
    Optional size in bytes of the shared-memory segment (dmb's default is
    used when unset).
``CHAT_CHANNEL_BACKEND``
    Optional dotted path of another channel layer backend. Only meant for
    comparing against ``channels_redis.core.RedisChannelLayer`` during
    development; ``CHAT_REDIS_URL`` then names the Redis server.
``DJANGO_SECRET_KEY``, ``DJANGO_DEBUG``, ``DJANGO_ALLOWED_HOSTS``
    The usual Django knobs; the defaults suit a local run only.
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# A fixed development key keeps the example runnable with no set-up; a real
# deployment must set DJANGO_SECRET_KEY.
SECRET_KEY = os.environ.get(
    "DJANGO_SECRET_KEY", "dev-only-insecure-key-for-the-dmb-chat-example"
)
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]

ROOT_URLCONF = "chatsite.urls"
ASGI_APPLICATION = "chatsite.asgi.application"

# The chat keeps no state of its own: rooms are channel layer groups. With no
# database configured Django never opens a connection.
DATABASES = {}

USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# The only templates are inline strings, so no template directories.
TEMPLATES = []

# The channel layer. Every process of the site (each server worker, the job
# worker, anything that sends) builds its own layer from this; they meet in
# the shared-memory segment named by the prefix.
_backend = os.environ.get("CHAT_CHANNEL_BACKEND", "dmb.SharedMemoryChannelLayer")
_layer_config = {"prefix": os.environ.get("DMB_PREFIX", "chat")}
if _backend.startswith("channels_redis."):
    _layer_config["hosts"] = [
        os.environ.get("CHAT_REDIS_URL", "redis://127.0.0.1:6379/0")
    ]
elif os.environ.get("DMB_SIZE"):
    _layer_config["size"] = int(os.environ["DMB_SIZE"])

CHANNEL_LAYERS = {"default": {"BACKEND": _backend, "CONFIG": _layer_config}}

INSTALLED_APPS = [
    # "channels" provides the runworker management command.
    "channels",
    "chat",
]
if _backend.startswith("dmb."):
    # dmb's system checks: `manage.py check` reports a wrong CONFIG option
    # before any server starts.
    INSTALLED_APPS.append("dmb")

# Pause between two steps of a job run by `manage.py runworker jobs`.
CHAT_JOB_STEP_SECONDS = float(os.environ.get("CHAT_JOB_STEP_SECONDS", "0.5"))

# Log to the console so that the server processes (and runworker, whose
# start-up line the demo and the tests wait for) show what they do.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {
            "format": "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
        }
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "chat": {"handlers": ["console"], "level": "INFO"},
        # dmb says at INFO when a group member was skipped because its
        # channel was full, and warns when the segment itself is full.
        "dmb": {"handlers": ["console"], "level": "INFO"},
        # Not propagated: Django's own "django" handlers would print it twice
        # when DEBUG is on.
        "django.channels": {
            "handlers": ["console"],
            "level": "INFO",
            "propagate": False,
        },
        "django.request": {"handlers": ["console"], "level": "WARNING"},
    },
}
