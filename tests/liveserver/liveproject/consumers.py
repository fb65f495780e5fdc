import json
import os

from channels.generic.websocket import AsyncWebsocketConsumer


class RoomConsumer(AsyncWebsocketConsumer):
    """Joins the group "room"; says which process serves it; passes what
    the browser sends on to the normal channel "inbox"."""

    async def connect(self):
        await self.channel_layer.group_add("room", self.channel_name)
        await self.accept()
        await self.send(json.dumps({"pid": os.getpid()}))

    async def disconnect(self, code):
        await self.channel_layer.group_discard("room", self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        await self.channel_layer.send(
            "inbox", {"type": "inbox.message", "text": text_data, "pid": os.getpid()}
        )

    async def room_message(self, event):
        await self.send(json.dumps({"text": event["text"], "pid": os.getpid()}))
