"""The example's tasks, run by ``celery -A jobsite worker``."""

import logging
import os
import time

from asgiref.sync import async_to_sync
from celery import shared_task
from channels.layers import get_channel_layer
from django.conf import settings

from .progress import job_group

logger = logging.getLogger(__name__)


@shared_task(bind=True)
def count(self, steps):
    """A long job: ``steps`` pauses, each reported to the job's group.

    The report goes through the Channels layer, that is through the same
    segment the task came by; the websocket consumers of the job's page
    pass it on to the browser.  The return value goes to the result
    backend.
    """
    layer = get_channel_layer()
    group = job_group(self.request.id)
    for done in range(1, steps + 1):
        time.sleep(settings.JOBS_STEP_SECONDS)
        async_to_sync(layer.group_send)(
            group, {"type": "job.progress", "done": done, "total": steps}
        )
    result = {"steps": steps, "worker": self.request.hostname, "pid": os.getpid()}
    async_to_sync(layer.group_send)(group, {"type": "job.done", "result": result})
    return result


@shared_task
def tick():
    """Scheduled by ``celery beat``: leaves a mark in the results directory."""
    mark = settings.RESULTS_DIR / "ticks"
    with open(mark, "a") as f:
        f.write(f"{time.time():.3f} {os.getpid()}\n")
    return "tick"
