"""The websocket of a job's page: the job's progress as it happens."""

from asgiref.sync import sync_to_async
from celery.result import AsyncResult
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from .progress import job_group


class JobConsumer(AsyncJsonWebsocketConsumer):
    """Follows one job: joins its group, then relays what the task sends.

    After joining, it sends the job's state from the result backend, so a
    page that connects late (or after the job ended) still learns it.
    """

    async def connect(self):
        self.job_id = self.scope["url_route"]["kwargs"]["job_id"]
        self.group = job_group(self.job_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        state, result = await sync_to_async(_state)(self.job_id)
        await self.send_json({"type": "state", "state": state, "result": result})

    async def disconnect(self, code):
        await self.channel_layer.group_discard(self.group, self.channel_name)

    async def job_progress(self, event):
        await self.send_json(
            {"type": "progress", "done": event["done"], "total": event["total"]}
        )

    async def job_done(self, event):
        await self.send_json({"type": "done", "result": event["result"]})


def _state(job_id):
    found = AsyncResult(job_id)
    return found.state, found.result if found.successful() else None
