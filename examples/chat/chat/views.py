"""Plain synchronous Django views of the chat.

They are ordinary sync views on purpose: they show that code outside any
consumer (a view, a management command, a cron job) reaches the room's
websocket connections through the channel layer with async_to_sync.
"""

import json
import logging
import os
import uuid

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from . import rooms
from .page import INDEX_HTML

logger = logging.getLogger(__name__)


def _json_body(request):
    """The request's JSON object body, or its form fields, or None."""
    if request.content_type == "application/json":
        try:
            body = json.loads(request.body or b"{}")
        except ValueError:
            return None
        return body if isinstance(body, dict) else None
    return request.POST.dict()


@require_GET
def index(request):
    return HttpResponse(INDEX_HTML)


@require_GET
def healthz(request):
    # The pid tells a caller which server process answered.
    return JsonResponse({"ok": True, "pid": os.getpid()})


# These endpoints are called by scripts and by the inline page, with no
# session or cookie, so CSRF protection has nothing to protect here. A real
# site would put them behind its own authentication.
@csrf_exempt
@require_POST
def announce(request, room):
    body = _json_body(request)
    text = body.get("text") if body else None
    if not isinstance(text, str) or not 0 < len(text) <= rooms.MAX_TEXT:
        return JsonResponse(
            {"ok": False, "error": f"'text' must be 1 to {rooms.MAX_TEXT} characters"},
            status=400,
        )
    layer = get_channel_layer()
    async_to_sync(layer.group_send)(
        rooms.room_group(room),
        {"type": "room.announce", "text": text, "pid": os.getpid()},
    )
    logger.info("announced to room %s", room)
    return JsonResponse({"ok": True, "room": room, "pid": os.getpid()}, status=202)


@csrf_exempt
@require_POST
def start_job(request, room):
    body = _json_body(request) or {}
    job = body.get("job") or uuid.uuid4().hex[:12]
    try:
        steps = int(body.get("steps", 5))
    except (TypeError, ValueError):
        steps = 0
    if not rooms.is_valid_job_id(job) or not 1 <= steps <= rooms.MAX_JOB_STEPS:
        return JsonResponse({"ok": False, "error": "bad 'job' or 'steps'"}, status=400)
    layer = get_channel_layer()
    async_to_sync(layer.send)(rooms.JOBS_CHANNEL, rooms.job_request(room, job, steps))
    return JsonResponse({"ok": True, "room": room, "job": job}, status=202)
