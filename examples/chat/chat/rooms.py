"""Names shared by the chat's websocket consumers, views and job worker."""

import re

# Room names appear in URLs and become part of a channel layer group name,
# which Channels limits to ASCII letters, digits, "-", "_" and "." and fewer
# than 100 characters. Keeping rooms to a stricter subset means any room that
# routes is also a valid group.
ROOM_PATTERN = r"[A-Za-z0-9_-]{1,64}"
_ROOM_RE = re.compile(ROOM_PATTERN)

# Job identifiers are chosen by the client so that it can recognise the
# progress reports of its own job among the room's traffic.
_JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,40}")

# The normal (not process-specific) channel that `manage.py runworker jobs`
# listens on. Any process may send to it; exactly one worker receives each
# message.
JOBS_CHANNEL = "jobs"

MAX_TEXT = 2000
MAX_SENDER = 64
MAX_JOB_STEPS = 20


def is_valid_room(room):
    return isinstance(room, str) and _ROOM_RE.fullmatch(room) is not None


def is_valid_job_id(job):
    return isinstance(job, str) and _JOB_ID_RE.fullmatch(job) is not None


def room_group(room):
    """The channel layer group whose members are the room's connections."""
    if not is_valid_room(room):
        raise ValueError(f"invalid room name: {room!r}")
    return f"room.{room}"


def job_request(room, job, steps):
    """The message that asks the job worker to run one job for a room."""
    return {"type": "job.run", "room": room, "job": job, "steps": steps}
