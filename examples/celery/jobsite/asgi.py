"""ASGI entry point: ``jobsite.asgi:application`` (uvicorn, daphne...)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "jobsite.settings")

# Django must be set up before the consumers are imported.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402
from jobs.consumers import JobConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter(
            [re_path(r"^ws/jobs/(?P<job_id>[\w-]+)/$", JobConsumer.as_asgi())]
        ),
    }
)
