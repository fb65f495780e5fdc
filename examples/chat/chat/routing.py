"""Websocket routes of the chat example."""

from django.urls import re_path

from . import consumers, rooms

websocket_urlpatterns = [
    re_path(
        rf"^ws/rooms/(?P<room>{rooms.ROOM_PATTERN})/$",
        consumers.RoomConsumer.as_asgi(),
    ),
]
