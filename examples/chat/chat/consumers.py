"""The chat's consumers: one per websocket connection, and the job worker."""

import asyncio
import json
import logging
import os
import uuid

from channels.consumer import AsyncConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from . import rooms

logger = logging.getLogger(__name__)


class RoomConsumer(AsyncJsonWebsocketConsumer):
    """One websocket connection to one room.

    Joining the room is joining its channel layer group, so a message sent to
    the group reaches every connection of the room whichever server process
    holds it. The first frame sent to the client names the pid of the process
    serving it; the demo and the tests use it to see how connections spread
    over the workers.
    """

    async def connect(self):
        self.room = self.scope["url_route"]["kwargs"]["room"]
        self.group = rooms.room_group(self.room)
        # Join before accepting: once the client has its hello it is certain
        # to receive everything sent to the room afterwards.
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json(
            {
                "type": "hello",
                "pid": os.getpid(),
                "room": self.room,
                "channel": self.channel_name,
            }
        )

    async def disconnect(self, code):
        # A process killed outright never gets here; the channel layer is
        # responsible for forgetting the memberships of dead processes.
        await self.channel_layer.group_discard(self.group, self.channel_name)

    @classmethod
    async def decode_json(cls, text_data):
        # A frame that is not JSON gets an error reply instead of tearing the
        # connection down.
        try:
            return json.loads(text_data)
        except ValueError:
            return None

    async def receive_json(self, content, **kwargs):
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "chat":
            await self._chat(content)
        elif kind == "job":
            await self._job(content)
        else:
            await self._error("expected a JSON object with type 'chat' or 'job'")

    async def _chat(self, content):
        text = content.get("text")
        sender = content.get("sender", "")
        if not isinstance(text, str) or not 0 < len(text) <= rooms.MAX_TEXT:
            await self._error(f"'text' must be 1 to {rooms.MAX_TEXT} characters")
            return
        if not isinstance(sender, str) or len(sender) > rooms.MAX_SENDER:
            await self._error(f"'sender' must be at most {rooms.MAX_SENDER} chars")
            return
        event = {"type": "chat.message", "text": text, "sender": sender}
        # Clients may tag their messages (the demo numbers them and stamps
        # the time they were sent, to count deliveries and measure latency).
        seq, ts = content.get("seq"), content.get("ts")
        if isinstance(seq, int) and not isinstance(seq, bool):
            event["seq"] = seq
        if isinstance(ts, (int, float)) and not isinstance(ts, bool):
            event["ts"] = ts
        await self.channel_layer.group_send(self.group, event)

    async def _job(self, content):
        steps = content.get("steps", 5)
        job = content.get("job") or uuid.uuid4().hex[:12]
        if not isinstance(steps, int) or not 1 <= steps <= rooms.MAX_JOB_STEPS:
            await self._error(f"'steps' must be an integer 1..{rooms.MAX_JOB_STEPS}")
            return
        if not rooms.is_valid_job_id(job):
            await self._error("'job' must be 1 to 40 letters, digits, '-' or '_'")
            return
        await self.channel_layer.send(
            rooms.JOBS_CHANNEL, rooms.job_request(self.room, job, steps)
        )
        await self.send_json({"type": "job.queued", "job": job, "steps": steps})

    async def _error(self, error):
        await self.send_json({"type": "error", "error": error})

    # Handlers for the events sent to the room's group. Channels maps an
    # event type "chat.message" to the method chat_message.

    async def chat_message(self, event):
        out = {k: v for k, v in event.items() if k != "type"}
        await self.send_json({"type": "chat", "room": self.room, **out})

    async def room_announce(self, event):
        await self.send_json(
            {
                "type": "announce",
                "room": self.room,
                "text": event["text"],
                "pid": event["pid"],
            }
        )

    async def job_progress(self, event):
        out = {k: v for k, v in event.items() if k != "type"}
        await self.send_json({"type": "job", "room": self.room, **out})


class JobConsumer(AsyncConsumer):
    """Runs slow jobs sent to the "jobs" channel (`manage.py runworker jobs`).

    A job is a few steps with a pause between them, standing in for real
    work done away from the websocket servers. After each step it reports
    its progress to the job's room.
    """

    async def job_run(self, message):
        room, job, steps = message.get("room"), message.get("job"), message.get("steps")
        # Anything on the site can send to this channel; a malformed request
        # is logged and dropped rather than killing the worker.
        if not (
            rooms.is_valid_room(room)
            and rooms.is_valid_job_id(job)
            and isinstance(steps, int)
            and 1 <= steps <= rooms.MAX_JOB_STEPS
        ):
            logger.warning("ignoring malformed job request: %r", message)
            return
        group = rooms.room_group(room)
        delay = settings.CHAT_JOB_STEP_SECONDS
        logger.info("job %s for room %s: %d steps", job, room, steps)
        for step in range(1, steps + 1):
            await asyncio.sleep(delay)
            await self.channel_layer.group_send(
                group,
                {
                    "type": "job.progress",
                    "job": job,
                    "step": step,
                    "steps": steps,
                    "done": step == steps,
                    "pid": os.getpid(),
                },
            )
        logger.info("job %s done", job)
