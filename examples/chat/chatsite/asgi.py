"""ASGI entry point: ``chatsite.asgi:application``.

Serve it with uvicorn, daphne or gunicorn's UvicornWorker. The "channel"
protocol is what `python manage.py runworker jobs` runs.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")

# Django must be set up before anything imports models or settings-dependent
# code, consumers included, so this comes first.
django_asgi_app = get_asgi_application()

from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from chat import consumers, rooms, routing

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Refuse websocket handshakes from pages served by other sites.
        "websocket": AllowedHostsOriginValidator(
            URLRouter(routing.websocket_urlpatterns)
        ),
        "channel": ChannelNameRouter(
            {rooms.JOBS_CHANNEL: consumers.JobConsumer.as_asgi()}
        ),
    }
)
