"""``python -m dmb.inspect``: look into dmb segments without joining them.

The tool maps a segment and reads it through the C core's inspection calls
(``dmb_stats``, ``dmb_slot_info``, ``dmb_channel_at``, ``dmb_group_at``,
``dmb_group_members``, ``dmb_peek``).  It never takes a process slot, so
the workers attached to the segment neither see it nor wait for it beyond
the few hundred nanoseconds each of those calls holds the segment lock.  It
changes nothing unless a flag asks it to (``--purge``, ``--unlink``), and
it never creates or formats a segment.  One write it cannot avoid: if a
process died holding the lock, whoever takes the lock next repairs the
segment (the robust mutex's rule), and that may be this tool.

Views: the list of segments (no target), one segment (``--prefix``,
``--name`` or ``--settings``), each as text, ``--json`` or ``--prometheus``,
once or live (``--watch``); and ``--peek``, ``--purge``, ``--unlink``.
docs/operations.md shows each, the JSON schema and the exit codes.
"""

import argparse
import base64
import importlib
import json
import logging
import math
import os
import pwd
import shutil
import stat
import sys
import threading
import time

import msgpack
import posix_ipc

from . import segment as seg
from ._ring_cffi import ffi, lib
from .errors import ConfigError, SegmentCorrupt, SegmentError
from .layer import BACKENDS, PREFIX_RE, validate_config

logger = logging.getLogger(__name__)

#: The version of the ``--json`` documents; docs/operations.md describes it.
SCHEMA = "dmb.inspect/1"

EXIT_OK = 0
EXIT_ERROR = 1  # anything not covered below
EXIT_USAGE = 2  # bad arguments or settings
EXIT_NO_SEGMENT = 3
EXIT_PERMISSION = 4
EXIT_NOT_DMB = 5  # not a dmb segment, another layout version, never formatted
EXIT_REFUSED = 6  # --unlink while live processes are attached, without --force
EXIT_DAMAGED = 7  # truncated or inconsistent segment, or its lock is stuck
EXIT_INTERRUPTED = 130  # Ctrl-C before the work was done (128 + SIGINT)

COUNTERS = (
    "sent",
    "received",
    "expired",
    "dropped_full",
    "dropped_dead",
    "flushed",
    "group_sends",
    "bytes_sent",
    "bytes_received",
    "refused_full",
    "refused_nospace",
    "repairs",
)
DEFAULT_TIMEOUT = 5.0
_NS = 1_000_000_000
_MEMBER_PAGE = 64
_HEADER_PROBE = 512  # bytes of the segment header (HEADER_BYTES in _ring.c)
_FIRST_PEEK_BUFFER = 64 * 1024
#: A lock held past the C core's patience; older cores wait instead.
_ERR_STALLED = getattr(lib, "DMB_ERR_STALLED", None)

# Screen control for --watch: the alternate screen (left as it was on exit),
# cursor home, erase to the end of the line and of the screen.
_ALT_SCREEN_ON = "\x1b[?1049h\x1b[?25l"
_ALT_SCREEN_OFF = "\x1b[?25h\x1b[?1049l"
_HOME_CLEAR = "\x1b[H\x1b[2J"
_HOME = "\x1b[H"
_ERASE_LINE = "\x1b[K"
_ERASE_BELOW = "\x1b[J"


class InspectError(Exception):
    """A failure with its exit code; the message says what to do.

    ``status`` is the word the list view shows for a segment it cannot read.
    """

    def __init__(self, code, message, status=None):
        super().__init__(message)
        self.code = code
        self.status = status or ("not_dmb" if code == EXIT_NOT_DMB else "damaged")


# Opening and reading one segment.


class SegmentReader:
    """One segment, mapped but not joined: no slot, no wake-up FIFO.

    Every read is one short C call under the segment lock (``dmb_slot_info``
    takes none); a C error code becomes an ``InspectError``.
    """

    def __init__(self, name):
        self.name = name
        self.path = seg.segment_path(name)
        self._segment = _open_segment(name)
        self.handle = self._segment.handle
        self.identity = _identity(self.path)

    @property
    def replaced(self):
        """Has the name been removed, or given to a new segment, since?"""
        return _identity(self.path) != self.identity

    def close(self):
        """Unmap, unless a read that timed out may still touch the mapping."""
        if not _is_stuck(self.name):
            self._segment.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def stats(self):
        stats = ffi.new("struct dmb_stats *")
        self._check(lib.dmb_stats(self.handle, stats), "read the header")
        return stats

    def slots(self):
        """Every slot in use, as dicts (a snapshot taken without the lock)."""
        info = ffi.new("struct dmb_slot_info *")
        found = []
        for slot in range(self.handle.geo.slots):
            self._check(lib.dmb_slot_info(self.handle, slot, info), "read a slot")
            if info.in_use:
                found.append(_slot_dict(slot, info))
        return found

    def channels(self):
        info = ffi.new("struct dmb_channel_info *")
        found = []
        for index in range(self.handle.geo.channels):
            rc = lib.dmb_channel_at(self.handle, index, info)
            self._check(rc, "read the channel table")
            if rc == 1:
                found.append(_channel_dict(info))
        return found

    def groups(self):
        info = ffi.new("struct dmb_group_info *")
        found = []
        for index in range(self.handle.geo.groups):
            rc = lib.dmb_group_at(self.handle, index, info)
            self._check(rc, "read the group table")
            if rc == 1:
                found.append({"name": _text(info.name), "members": info.members})
        return found

    def members(self, group):
        """The memberships of a group: (channel name, joined_ns) pairs."""
        name = group.encode()
        page = ffi.new("struct dmb_member_info[]", _MEMBER_PAGE)
        found = []
        while True:
            rc = lib.dmb_group_members(
                self.handle, name, len(name), len(found), page, _MEMBER_PAGE
            )
            self._check(rc, f"read the members of group {group!r}")
            found.extend((_text(page[i].channel), page[i].joined_ns) for i in range(rc))
            if rc < _MEMBER_PAGE:
                return found

    def peek(self, channel, count):
        """Up to ``count`` messages from the head of a channel, not taken.

        Each is ``(data, sent_ns)``.  Receivers may take messages between
        two peeks, so under traffic a message can be skipped or repeated.
        """
        name = channel.encode()
        size = _FIRST_PEEK_BUFFER
        buf, length, sent = (
            ffi.new("char[]", size),
            ffi.new("uint32_t *"),
            ffi.new("uint64_t *"),
        )
        found = []
        while len(found) < count:
            rc = lib.dmb_peek(
                self.handle, name, len(name), len(found), buf, size, length, sent
            )
            if rc == lib.DMB_ERR_TOOBIG:
                size = length[0]
                buf = ffi.new("char[]", size)
                continue
            self._check(rc, f"peek at channel {channel!r}")
            if rc == 0:
                break
            found.append((bytes(ffi.buffer(buf, length[0])), sent[0]))
        return found

    def purge(self, channel):
        """Drop every message queued on a channel; returns how many."""
        name = channel.encode()
        rc = lib.dmb_purge(self.handle, name, len(name))
        self._check(rc, f"purge channel {channel!r}")
        return rc

    def _check(self, rc, what):
        if rc >= 0:
            return
        if rc == lib.DMB_ERR_INVAL:
            raise InspectError(EXIT_USAGE, f"cannot {what}: invalid name")
        if rc == lib.DMB_ERR_LOCK:
            problem = "its lock is unusable"
        elif rc == _ERR_STALLED:
            raise InspectError(
                EXIT_DAMAGED,
                f"cannot {what} of segment {self.name!r}: a process has held its "
                f"lock for seconds (stopped or stuck while in an operation); "
                f"check the processes listed by `fuser -v {self.path}`",
                status="locked",
            )
        elif rc == lib.DMB_ERR_CORRUPT:
            problem = "it is damaged"
        else:
            problem = f"error code {rc}"
        raise InspectError(
            EXIT_DAMAGED,
            f"cannot {what} of segment {self.name!r}: {problem}; a worker repairs "
            f"what it can on its next operation, otherwise stop the site's "
            f"processes and remove the segment (--unlink --force)",
        )


def _identity(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _open_segment(name):
    """Map an existing segment, or raise InspectError with the right code."""
    path = seg.segment_path(name)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _missing(name)
    except PermissionError as exc:
        raise InspectError(EXIT_PERMISSION, f"cannot look at {path}: {exc.strerror}")
    if not stat.S_ISREG(st.st_mode):
        raise InspectError(EXIT_NOT_DMB, f"{path} is not a shared-memory segment")
    _check_access(name, path, st)
    try:
        return seg.Segment(name, create=False)
    except FileNotFoundError:
        raise _missing(name)
    except SegmentCorrupt as exc:
        raise InspectError(EXIT_DAMAGED, str(exc))
    except SegmentError as exc:
        raise InspectError(EXIT_NOT_DMB, str(exc), _header_status(path))


def _missing(name):
    return InspectError(
        EXIT_NO_SEGMENT,
        f"no such segment {name!r} ({seg.segment_path(name)}); `python -m "
        f"dmb.inspect` lists the segments there are",
    )


def _header_status(path):
    """Why a segment's header was refused: the C core's check, on a copy."""
    try:
        with open(path, "rb") as f:
            header = f.read(_HEADER_PROBE)
    except OSError:
        return "not_dmb"
    if len(header) < _HEADER_PROBE:
        return "uninitialised" if not header.strip(b"\0") else "not_dmb"
    copy = ffi.from_buffer(bytearray(header))
    rc = lib.dmb_attach(ffi.new("struct dmb_handle *"), copy, len(header))
    statuses = {
        lib.DMB_ERR_UNINIT: "uninitialised",
        lib.DMB_ERR_VERSION: "other_version",
    }
    return statuses.get(rc, "not_dmb")


def _check_access(name, path, st):
    """Reading takes the segment lock, so it needs read and write access."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except PermissionError:
        raise InspectError(
            EXIT_PERMISSION,
            f"permission denied: segment {name!r} belongs to "
            f"{_user(st.st_uid)} with mode {stat.S_IMODE(st.st_mode):04o}; run "
            f"as that user (reading takes the segment lock, which needs read "
            f"and write access)",
        )
    except FileNotFoundError:
        raise _missing(name)
    os.close(fd)


def _user(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


#: The latest read of each segment, by name: an event its thread sets once
#: it has left the mapping.  --watch reads again each frame and must not
#: pile up one stuck thread per frame, and nothing may unmap a segment
#: while a read is inside it.
_reads = {}


def guarded(function, timeout, name, what=None):
    """Run ``function()`` in a thread; give up after ``timeout`` seconds.

    Opening a segment takes its flock, and every read takes its lock; a
    process stopped while holding either (or garbage where the lock should
    be) would hang this tool, so the main thread waits with a limit.  A
    thread left stuck holds nothing: it is only waiting.

    Whether the read is over is what the thread itself says, by an event
    it sets on its way out, never ``Thread.is_alive()``: on Python 3.11 a
    Ctrl-C that interrupts ``join()`` marks a running thread stopped, and
    unmapping under a thread that holds the segment lock would crash this
    tool and leave the lock held for every process of the site.
    """
    what = what or name
    if _is_stuck(name):
        raise InspectError(
            EXIT_DAMAGED,
            f"{what}: still waiting for the segment lock (see above)",
            status="locked",
        )
    result = {}
    done = threading.Event()

    def run():
        try:
            result["value"] = function()
        except BaseException as exc:  # handed to the main thread below
            result["error"] = exc
        finally:
            done.set()

    _reads[name] = done
    # Ctrl-C here goes straight up: the read may go on in its thread, and
    # close() leaves the mapping to it while it does (exit() then skips the
    # interpreter's teardown).
    threading.Thread(target=run, name=_READER, daemon=True).start()
    if not done.wait(timeout):
        raise InspectError(
            EXIT_DAMAGED,
            f"{what}: no answer within {timeout:g}s; a process is holding the "
            f"segment lock (stopped or stuck while in an operation), or the "
            f"segment is damaged; check the processes listed by "
            f"`fuser -v {seg.segment_path(name)}`",
            status="locked",
        )
    if "error" in result:
        raise result["error"]
    return result["value"]


_READER = "dmb-inspect-read"


def _is_stuck(name):
    """Is a read of this segment still inside its mapping?"""
    return name in _reads and not _reads[name].is_set()


# Turning C structs into plain dicts.


def _text(chars):
    """A NUL-terminated name from the segment, decoded whatever it holds."""
    return ffi.string(chars).decode("utf-8", "replace")


def _slot_dict(slot, info):
    return {
        "slot": slot,
        "pid": info.pid,
        "start_time": info.start_time,
        "client": _text(info.client),
        "channels_owned": info.channels,
        "attached_ns": info.attached_ns,
        "active_ns": info.active_ns,
    }


def _channel_dict(info):
    waiters = info.waiters[0] | (info.waiters[1] << 64)
    return {
        "name": _text(info.name),
        "owner": info.owner,
        "depth": info.depth,
        "capacity": info.capacity,
        "bytes": info.bytes,
        "oldest_ns": info.oldest_ns if info.depth else 0,
        "waiting_slots": [i for i in range(lib.DMB_MAX_SLOTS) if waiters >> i & 1],
        "memberships": info.members,
    }


def _age(now_ns, then_ns):
    """Seconds from a CLOCK_MONOTONIC stamp to now, or None if unset."""
    if not then_ns:
        return None
    return round(max(0, now_ns - then_ns) / _NS, 3)


def _alive(process):
    pid = process["pid"]
    return pid > 0 and seg.process_alive(pid, process["start_time"])


# Building the documents (the same dicts serve --json, text and Prometheus).


def segment_document(reader, members_of=None):
    """The ``segment`` view: everything about one segment, as plain data."""
    stats = reader.stats()
    slots = reader.slots()
    channels = reader.channels()
    groups = reader.groups()
    members = reader.members(members_of) if members_of is not None else None
    now = time.monotonic_ns()
    return {
        "schema": SCHEMA,
        "view": "segment",
        "generated_at": round(time.time(), 3),
        "segment": _header_dict(reader, stats),
        "processes": [_process_dict(p, now) for p in slots],
        "channels": sorted(
            (_channel_out(c, now) for c in channels),
            key=lambda c: (-c["depth"], c["name"]),
        ),
        "groups": sorted(groups, key=lambda g: (-g["members"], g["name"])),
        "members": _members_out(members_of, members, now),
        "counters": {name: getattr(stats.counters, name) for name in COUNTERS},
        "rates": None,
        "celery": _celery_queues(reader, channels),
    }


def _celery_queues(reader, channels):
    """The kombu (Celery) queues in the segment; empty without kombu.

    kombu is imported only for a segment that holds its channels: a site
    without Celery never pays for it.
    """
    if not any(c["name"].startswith("kombu:") for c in channels):
        return []
    try:
        from .kombu import queue_summary
    except ImportError:  # kombu is not installed: no Celery queues to read
        return []
    return queue_summary(reader)


def _header_dict(reader, stats):
    geo = stats.geometry
    st = _stat_or_none(reader.path)
    block = stats.block_size
    return {
        "name": reader.name,
        "path": reader.path,
        "uid": st.st_uid if st else None,
        "mode": f"{stat.S_IMODE(st.st_mode):04o}" if st else None,
        "layout_version": stats.version,
        "size": stats.size,
        "block_size": block,
        "created_at": round(stats.created_ns / _NS, 3),
        "store": {
            "capacity_bytes": geo.blocks * block,
            "used_bytes": stats.used_blocks * block,
            "high_water_bytes": stats.peak_blocks * block,
            "queued_messages": stats.queued,
        },
        "tables": {
            "slots": _usage(stats.used_slots, geo.slots),
            "channels": _usage(stats.used_channels, geo.channels),
            "groups": _usage(stats.used_groups, geo.groups),
            "memberships": _usage(stats.used_members, geo.members),
            "queue_entries": _usage(stats.used_nodes, geo.nodes),
            "blocks": _usage(stats.used_blocks, geo.blocks),
        },
    }


def _usage(used, total):
    return {"used": used, "total": total}


def _stat_or_none(path):
    try:
        return os.stat(path)
    except OSError:
        return None


def _process_dict(process, now):
    return {
        "slot": process["slot"],
        "pid": process["pid"],
        "alive": _alive(process),
        "client": process["client"],
        "channels_owned": process["channels_owned"],
        "attached_seconds": _age(now, process["attached_ns"]),
        "idle_seconds": _age(now, process["active_ns"]),
    }


def _channel_out(channel, now):
    owner = channel["owner"]
    return {
        "name": channel["name"],
        "specific": owner >= 0,
        "owner_slot": owner if owner >= 0 else None,
        "depth": channel["depth"],
        "capacity": channel["capacity"],
        "bytes": channel["bytes"],
        "oldest_age_seconds": _age(now, channel["oldest_ns"]),
        "waiting": len(channel["waiting_slots"]),
        "waiting_slots": channel["waiting_slots"],
        "memberships": channel["memberships"],
    }


def _members_out(group, members, now):
    if group is None:
        return None
    return {
        "group": group,
        "members": [
            {"channel": channel, "age_seconds": _age(now, joined)}
            for channel, joined in sorted(members)
        ],
    }


def list_document(timeout):
    """The ``list`` view: every dmb segment in /dev/shm this user can open."""
    entries, unreadable = [], 0
    for name in _segment_names():
        try:
            entry = guarded(lambda name=name: _list_entry(name), timeout, name)
        except InspectError as exc:
            if exc.code == EXIT_PERMISSION:
                unreadable += 1
                continue
            if exc.code == EXIT_NO_SEGMENT:
                continue  # removed while we looked
            entry = _broken_entry(name, exc)
        entries.append(entry)
    return {
        "schema": SCHEMA,
        "view": "list",
        "generated_at": round(time.time(), 3),
        "segments": entries,
        "unreadable": unreadable,
    }


def _segment_names():
    """The names of the dmb-* objects in /dev/shm, wake-up FIFOs left out."""
    try:
        files = os.listdir(seg.SHM_DIR)
    except OSError as exc:
        raise InspectError(EXIT_ERROR, f"cannot list {seg.SHM_DIR}: {exc.strerror}")
    names = []
    for file in sorted(files):
        if not file.startswith("dmb-") or file.endswith(".wake"):
            continue
        st = _stat_or_none(os.path.join(seg.SHM_DIR, file))
        if st is not None and stat.S_ISREG(st.st_mode):
            names.append("/" + file)
    return names


def _list_entry(name):
    with SegmentReader(name) as reader:
        stats = reader.stats()
        processes = reader.slots()
        entry = _entry_base(name)
        live = sum(1 for p in processes if _alive(p))
        entry.update(
            status="ok",
            layout_version=stats.version,
            size=stats.size,
            used_bytes=stats.used_blocks * stats.block_size,
            capacity_bytes=stats.geometry.blocks * stats.block_size,
            queued_messages=stats.queued,
            processes={"live": live, "dead": len(processes) - live},
        )
        return entry


def _entry_base(name):
    path = seg.segment_path(name)
    st = _stat_or_none(path)
    return {
        "name": name,
        "path": path,
        "uid": st.st_uid if st else None,
        "mode": f"{stat.S_IMODE(st.st_mode):04o}" if st else None,
        "status": "ok",
        "error": None,
        "layout_version": None,
        "size": st.st_size if st else None,
        "used_bytes": None,
        "capacity_bytes": None,
        "queued_messages": None,
        "processes": None,
    }


def _broken_entry(name, exc):
    entry = _entry_base(name)
    entry["status"] = exc.status
    entry["error"] = str(exc)
    return entry


def peek_document(reader, channel, count, bytes_as):
    now = time.monotonic_ns()
    messages = []
    for position, (data, sent_ns) in enumerate(reader.peek(channel, count)):
        message, error = decode_message(data, bytes_as)
        messages.append(
            {
                "position": position,
                "age_seconds": _age(now, sent_ns),
                "size": len(data),
                "message": message,
                "error": error,
                "raw": _b64(data) if error else None,
            }
        )
    return {
        "schema": SCHEMA,
        "view": "peek",
        "generated_at": round(time.time(), 3),
        "segment": reader.name,
        "channel": channel,
        "messages": messages,
    }


def decode_message(data, bytes_as="base64"):
    """msgpack bytes to a JSON-ready value, and an error text or None."""
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # any damage a payload can show
        return None, f"not a msgpack message: {exc}"
    return _jsonable(value, bytes_as), None


def _jsonable(value, bytes_as):
    if isinstance(value, dict):
        return {_key(k, bytes_as): _jsonable(v, bytes_as) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, bytes_as) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return {"$base64": _b64(value)} if bytes_as == "base64" else repr(bytes(value))
    if isinstance(value, msgpack.ExtType):
        return {"$ext": value.code, "$base64": _b64(value.data)}
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def _key(key, bytes_as):
    if isinstance(key, str):
        return key
    if isinstance(key, (bytes, bytearray)) and bytes_as == "repr":
        return repr(bytes(key))
    if isinstance(key, (bytes, bytearray)):
        return "$base64:" + _b64(key)
    return json.dumps(_jsonable(key, bytes_as))


def _b64(data):
    return base64.b64encode(bytes(data)).decode("ascii")


def add_rates(document, previous):
    """Per-second counter rates since ``previous`` (the last frame)."""
    if previous is None:
        return document
    elapsed = document["generated_at"] - previous["generated_at"]
    if elapsed <= 0:
        return document
    document["rates"] = {
        name: round((value - previous["counters"][name]) / elapsed, 2)
        for name, value in document["counters"].items()
    }
    return document


# Text rendering.


def render_list(document):
    rows = []
    for entry in document["segments"]:
        processes = entry["processes"] or {}
        rows.append(
            [
                entry["name"],
                _user(entry["uid"]) if entry["uid"] is not None else "?",
                _size(entry["size"]),
                _size(entry["used_bytes"]),
                _number(entry["queued_messages"]),
                _number(processes.get("live")),
                _number(processes.get("dead")),
                entry["status"].replace("_", " "),
            ]
        )
    lines = []
    if rows:
        header = ["SEGMENT", "OWNER", "SIZE", "USED", "QUEUED", "LIVE", "DEAD"]
        lines += _table(header + ["STATUS"], rows, "<<>>>>><")
    else:
        lines.append(f"no dmb segments in {seg.SHM_DIR} that this user can open")
    for entry in document["segments"]:
        if entry["error"]:
            lines.append(entry["error"])
    if document["unreadable"]:
        lines.append(
            f"({document['unreadable']} more dmb segments belong to other users "
            f"and cannot be opened by this one)"
        )
    return lines


def render_segment(document, limit=None, live=False):
    """The segment view as lines of text; ``limit`` caps each table.

    In the live view the counters come first, three to a row with their
    rates, so that they stay on screen when the tables below are cut to fit.
    """
    lines = _render_header(document["segment"])
    if live:
        lines += _render_live_counters(document["counters"], document["rates"])
    lines += _render_processes(document["processes"], limit)
    lines += _render_channels(document["channels"], limit)
    lines += _render_groups(document["groups"], limit)
    if document["members"] is not None:
        lines += _render_members(document["members"], limit)
    if document.get("celery"):
        lines += _render_celery(document["celery"], limit)
    if not live:
        lines += _render_counters(document["counters"])
    return lines


def _render_celery(queues, limit):
    rows = [
        [
            _printable(q["queue"]),
            str(q["ready"]),
            str(q["unacked"]),
            _duration(q["oldest_ready_age"]) if q["oldest_ready_age"] else "-",
            " ".join(
                f"{c['pid']}{'' if c['alive'] else '(dead)'}:{c['unacked']}"
                for c in q["consumers"]
            )
            or "-",
        ]
        for q in queues
    ]
    header = ["QUEUE", "READY", "UNACKED", "OLDEST", "OWNERS (pid:unacked)"]
    return _section(f"CELERY QUEUES  {len(rows)}", header, rows, "<>>><", limit)


def _render_header(header):
    store, tables = header["store"], header["tables"]
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(header["created_at"]))
    age = _duration(time.time() - header["created_at"])
    used = store["used_bytes"]
    share = 100 * used / store["capacity_bytes"] if store["capacity_bytes"] else 0
    share = "<0.1%" if 0 < share < 0.1 else f"{share:.1f}%"
    owner = _user(header["uid"]) if header["uid"] is not None else "?"
    where = f"{header['path']}, {owner}, mode {header['mode']}"
    version = f"layout version {header['layout_version']}"
    store_line = (
        f"  message store: {_size(used)} used of {_size(store['capacity_bytes'])} "
        f"({share}), high-water {_size(store['high_water_bytes'])}, "
        f"{store['queued_messages']} messages queued"
    )
    return [
        f"segment {header['name']}  ({where})",
        f"  {version}, {_size(header['size'])}, created {created} ({age} ago)",
        store_line,
    ] + _render_tables(tables)


def _render_tables(tables):
    usage = [
        f"{name.replace('_', ' ')} {t['used']}/{t['total']}"
        for name, t in tables.items()
    ]
    return ["  tables: " + ", ".join(usage[:3]), "          " + ", ".join(usage[3:])]


def _render_processes(processes, limit):
    live = sum(1 for p in processes if p["alive"])
    title = f"PROCESSES  {live} live, {len(processes) - live} dead"
    rows = [
        [
            str(p["slot"]),
            str(p["pid"]),
            "live" if p["alive"] else "dead",
            _printable(p["client"]),
            str(p["channels_owned"]),
            _duration(p["attached_seconds"]),
            _duration(p["idle_seconds"]),
        ]
        for p in processes
    ]
    header = ["SLOT", "PID", "STATE", "CLIENT", "CHANNELS", "ATTACHED", "IDLE"]
    return _section(title, header, rows, ">><<>>>", limit)


def _render_channels(channels, limit):
    rows = [
        [
            _printable(c["name"]),
            str(c["depth"]),
            str(c["capacity"]),
            _size(c["bytes"]),
            _duration(c["oldest_age_seconds"]),
            str(c["waiting"]),
            str(c["owner_slot"]) if c["specific"] else "-",
        ]
        for c in channels
    ]
    header = ["CHANNEL", "DEPTH", "CAP", "BYTES", "OLDEST", "WAITING", "OWNER"]
    return _section(f"CHANNELS  {len(channels)}", header, rows, "<>>>>>>", limit)


def _render_groups(groups, limit):
    rows = [[_printable(g["name"]), str(g["members"])] for g in groups]
    return _section(f"GROUPS  {len(groups)}", ["GROUP", "MEMBERS"], rows, "<>", limit)


def _render_members(members, limit):
    rows = [
        [_printable(m["channel"]), _duration(m["age_seconds"])]
        for m in members["members"]
    ]
    title = f"MEMBERS OF {_printable(members['group'])}  {len(rows)}"
    return _section(title, ["CHANNEL", "AGE"], rows, "<>", limit)


def _render_counters(counters):
    rows = [[name, str(value)] for name, value in counters.items()]
    return _section("COUNTERS", ["COUNTER", "TOTAL"], rows, "<>", None)


def _render_live_counters(counters, rates):
    """Three counters to a row; the rate is "-" until a second frame."""
    cells = [
        [name, str(value), f"{rates[name]:.1f}/s" if rates else "-"]
        for name, value in counters.items()
    ]
    rows = [
        [cell for counter in cells[i : i + 3] for cell in counter]
        for i in range(0, len(cells), 3)
    ]
    header = ["COUNTER", "TOTAL", "RATE"] * 3
    return _section("COUNTERS", header, rows, "<>>" * 3, None)


def _section(title, header, rows, align, limit):
    lines = ["", title]
    if not rows:
        return lines
    shown = rows if limit is None else rows[:limit]
    lines += ["  " + line for line in _table(header, shown, align)]
    if len(shown) < len(rows):
        lines.append(f"  ... and {len(rows) - len(shown)} more (--limit, --json)")
    return lines


def _table(header, rows, align):
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        parts = [
            cell.ljust(w) if a == "<" else cell.rjust(w)
            for cell, w, a in zip(cells, widths, align)
        ]
        return "  ".join(parts).rstrip()

    return [line(header)] + [line(r) for r in rows]


def _printable(text):
    """Names come from shared memory: never let one drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _size(value):
    if value is None:
        return "-"
    if value < 1024:
        return f"{value} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"


def _number(value):
    return "-" if value is None else str(value)


def _duration(seconds):
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _count(n, one, many=None):
    """'1 message', '2 messages'."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def render_peek(document):
    channel = _printable(document["channel"])
    count = len(document["messages"])
    title = (
        f"segment {document['segment']}, channel {channel}: "
        f"{_count(count, 'message')} from the head (not taken)"
    )
    lines = [title]
    for m in document["messages"]:
        lines.append(
            f"#{m['position']}  age {_duration(m['age_seconds'])}  {m['size']} bytes"
        )
        if m["error"]:
            lines.append(f"  {m['error']}; raw (base64): {m['raw']}")
        else:
            lines.append("  " + json.dumps(m["message"], ensure_ascii=False))
    return lines


# Prometheus text exposition.

#: Every metric: (type, help).  Samples are written grouped by metric.
_METRICS = {
    "dmb_segment_up": ("gauge", "1 if the segment could be read, else 0."),
    "dmb_segment_size_bytes": ("gauge", "Size of the segment."),
    "dmb_store_capacity_bytes": ("gauge", "Bytes of the message store."),
    "dmb_store_used_bytes": ("gauge", "Bytes of the message store in use."),
    "dmb_store_high_water_bytes": ("gauge", "Most store bytes ever in use at once."),
    "dmb_queued_messages": ("gauge", "Messages queued on all channels."),
    "dmb_processes": ("gauge", "Process slots in use, by whether the process lives."),
    "dmb_channels": ("gauge", "Channel table entries in use."),
    "dmb_groups": ("gauge", "Group table entries in use."),
    "dmb_memberships": ("gauge", "Membership table entries in use."),
    "dmb_messages_sent_total": ("counter", "Deliveries linked into channels."),
    "dmb_messages_received_total": ("counter", "Messages received."),
    "dmb_messages_expired_total": ("counter", "Messages dropped at expiry."),
    "dmb_messages_dropped_total": ("counter", "Messages dropped, by reason."),
    "dmb_messages_flushed_total": ("counter", "Messages flushed or purged."),
    "dmb_group_sends_total": ("counter", "group_send calls."),
    "dmb_sent_bytes_total": ("counter", "Payload bytes linked into channels."),
    "dmb_received_bytes_total": ("counter", "Payload bytes received."),
    "dmb_sends_refused_total": ("counter", "Sends refused, by reason."),
    "dmb_repairs_total": ("counter", "Repairs after a lock holder died."),
    "dmb_channel_depth": ("gauge", "Messages queued per normal channel."),
}
#: Counter name in the segment -> (metric, reason label or None).
_COUNTER_METRICS = {
    "sent": ("dmb_messages_sent_total", None),
    "received": ("dmb_messages_received_total", None),
    "expired": ("dmb_messages_expired_total", None),
    "dropped_full": ("dmb_messages_dropped_total", "full"),
    "dropped_dead": ("dmb_messages_dropped_total", "dead"),
    "flushed": ("dmb_messages_flushed_total", None),
    "group_sends": ("dmb_group_sends_total", None),
    "bytes_sent": ("dmb_sent_bytes_total", None),
    "bytes_received": ("dmb_received_bytes_total", None),
    "refused_full": ("dmb_sends_refused_total", "full"),
    "refused_nospace": ("dmb_sends_refused_total", "nospace"),
    "repairs": ("dmb_repairs_total", None),
}
_HEADER_GAUGES = {
    "dmb_store_capacity_bytes": "capacity_bytes",
    "dmb_store_used_bytes": "used_bytes",
    "dmb_store_high_water_bytes": "high_water_bytes",
    "dmb_queued_messages": "queued_messages",
}


def render_prometheus(documents, broken=()):
    """Text exposition of segment documents; ``broken`` names unreadable ones.

    Process-specific channels are left out of ``dmb_channel_depth``: their
    names are random, and would make a new series for every connection.
    """
    samples = {metric: [] for metric in _METRICS}
    for name in broken:
        samples["dmb_segment_up"].append(({"segment": name}, 0))
    for document in documents:
        _segment_samples(document, samples)
    lines = []
    for metric, found in samples.items():
        if not found:
            continue
        kind, help_text = _METRICS[metric]
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
        lines += [f"{metric}{_labels(labels)} {value}" for labels, value in found]
    return lines


def _segment_samples(document, samples):
    header = document["segment"]
    base = {"segment": header["name"]}
    samples["dmb_segment_up"].append((base, 1))
    samples["dmb_segment_size_bytes"].append((base, header["size"]))
    for metric, key in _HEADER_GAUGES.items():
        samples[metric].append((base, header["store"][key]))
    live = sum(1 for p in document["processes"] if p["alive"])
    dead = len(document["processes"]) - live
    samples["dmb_processes"].append((dict(base, state="live"), live))
    samples["dmb_processes"].append((dict(base, state="dead"), dead))
    for table in ("channels", "groups", "memberships"):
        samples[f"dmb_{table}"].append((base, header["tables"][table]["used"]))
    for counter, (metric, reason) in _COUNTER_METRICS.items():
        labels = dict(base, reason=reason) if reason else base
        samples[metric].append((labels, document["counters"][counter]))
    for channel in document["channels"]:
        if not channel["specific"]:
            labels = dict(base, channel=channel["name"])
            samples["dmb_channel_depth"].append((labels, channel["depth"]))


def _labels(labels):
    def escape(value):
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


# Choosing the segment.


def build_parser(prog=None):
    parser = argparse.ArgumentParser(
        prog=prog or "python -m dmb.inspect",
        description="Look into dmb shared-memory segments without joining them. "
        "With no target, list the segments this user can open.",
        epilog="Exit codes: 0 ok, 1 other error, 2 usage, 3 no such segment, "
        "4 permission denied, 5 not a dmb segment or another layout version, "
        "6 refused (--unlink while live processes are attached), 7 damaged "
        "segment or stuck lock.  See docs/operations.md.",
    )
    _add_target_arguments(parser)
    _add_action_arguments(parser)
    _add_output_arguments(parser)
    return parser


def _add_target_arguments(parser):
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--prefix", help="the layer's CONFIG prefix")
    target.add_argument("--name", help="the segment's name, e.g. /dmb-1000-asgi")
    target.add_argument(
        "--settings",
        metavar="MODULE",
        help="a Django settings module: use its CHANNEL_LAYERS",
    )
    target.add_argument("--list", action="store_true", help="list every segment")
    parser.add_argument("--alias", help="the CHANNEL_LAYERS alias, if several use dmb")
    parser.add_argument(
        "--uid", type=int, help="with --prefix: the user whose segment (default: you)"
    )


def _add_action_arguments(parser):
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--watch",
        nargs="?",
        const=1.0,
        type=_positive_float,
        metavar="SECONDS",
        help="redraw every SECONDS (default 1) until Ctrl-C",
    )
    action.add_argument("--peek", metavar="CHANNEL", help="show queued messages")
    action.add_argument(
        "--purge", metavar="CHANNEL", help="drop every message queued on CHANNEL"
    )
    action.add_argument(
        "--unlink",
        action="store_true",
        help="remove the segment (refused while "
        "live processes are attached, unless --force)",
    )
    action.add_argument(
        "--prometheus", action="store_true", help="Prometheus text exposition"
    )
    parser.add_argument("--force", action="store_true", help="with --unlink")


def _add_output_arguments(parser):
    parser.add_argument("--json", action="store_true", help=f"JSON ({SCHEMA})")
    parser.add_argument("--members", metavar="GROUP", help="list a group's members")
    parser.add_argument(
        "-n", type=_positive_int, default=10, help="with --peek: how many (10)"
    )
    parser.add_argument(
        "--bytes",
        choices=("base64", "repr"),
        default="base64",
        help="with --peek: how to show bytes values (base64)",
    )
    parser.add_argument(
        "--limit",
        type=_positive_int,
        help="rows per table in the text view (default: all; in --watch, "
        "what fits the terminal)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        help=f"give up on a segment whose lock stays taken (seconds, "
        f"{DEFAULT_TIMEOUT:g})",
    )


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(
            f"must be a positive, finite number: {text!r}"
        )
    return value


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _check_usage(parser, args, channel_layers):
    from_settings = args.settings or (channel_layers is not None and not args.name)
    if args.alias and not from_settings:
        parser.error("--alias goes with --settings (or manage.py dmb inspect)")
    if args.uid is not None and not (args.prefix or from_settings):
        parser.error("--uid goes with --prefix or --settings")
    if args.force and not args.unlink:
        parser.error("--force goes with --unlink")
    if args.prometheus and args.json:
        parser.error("choose one of --json and --prometheus")
    if args.list and (args.peek or args.purge or args.unlink or args.members):
        parser.error(
            "--list shows every segment; --peek, --purge, --unlink and "
            "--members need one (--prefix, --name or --settings)"
        )
    for option, channel in (("--peek", args.peek), ("--purge", args.purge)):
        if channel is not None and not _valid_channel_name(channel):
            parser.error(
                f"{option} {channel!r}: not a channel name (ASCII letters, "
                f"digits, '-', '_' and '.', with at most one '!', under 100 "
                f"characters), nor a Celery queue's 'kombu:' name"
            )
    if args.name and not args.name.startswith("/dmb-"):
        parser.error(
            f"--name {args.name!r}: dmb segment names look like /dmb-1000-asgi"
        )


def _valid_channel_name(name):
    """Channels' own rules, as every layer applies them; or one of the
    transport's ``kombu:`` names that the channel list shows."""
    from channels.layers import BaseChannelLayer

    if name.startswith("kombu:"):
        return True
    try:
        return BaseChannelLayer().require_valid_channel_name(name)
    except TypeError:
        return False


def target_name(args, channel_layers=None):
    """The segment the arguments name, or None for the list view."""
    if args.list:
        return None
    if args.name:
        return args.name
    if args.prefix:
        _check_prefix(args.prefix)
        return _private_or_shared(args.prefix, args.uid)
    if args.settings:
        channel_layers = _settings_layers(args.settings)
    if channel_layers is None:
        return None
    options = _options_from_layers(channel_layers, args.alias)
    if options["mode"] & 0o077 and args.uid is None:
        return seg.segment_name(options["prefix"], shared=True)
    return seg.segment_name(options["prefix"], args.uid)


def _private_or_shared(prefix, uid):
    """A prefix names a private segment (its user's) or a shared one (a
    ``mode`` that lets others in); take the private one unless only the
    shared one exists."""
    private = seg.segment_name(prefix, uid)
    shared = seg.segment_name(prefix, shared=True)
    exists = os.path.exists
    if uid is None and not exists(seg.segment_path(private)):
        return shared if exists(seg.segment_path(shared)) else private
    return private


def _check_prefix(prefix):
    if not PREFIX_RE.fullmatch(prefix):
        raise InspectError(
            EXIT_USAGE,
            f"--prefix {prefix!r}: a prefix is ASCII letters, digits, '-', '_' or '.'",
        )


def _settings_layers(module):
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        settings = importlib.import_module(module)
    except Exception as exc:  # whatever the settings module raises
        raise InspectError(
            EXIT_USAGE, f"cannot import settings module {module!r}: {exc}"
        )
    layers = getattr(settings, "CHANNEL_LAYERS", None)
    if not isinstance(layers, dict):
        raise InspectError(
            EXIT_USAGE, f"settings module {module!r} has no CHANNEL_LAYERS"
        )
    return layers


def _options_from_layers(layers, alias):
    """The validated CONFIG of the dmb entry of CHANNEL_LAYERS."""
    ours = {
        name: entry
        for name, entry in layers.items()
        if isinstance(entry, dict) and entry.get("BACKEND") in BACKENDS
    }
    if not ours:
        raise InspectError(EXIT_USAGE, "no CHANNEL_LAYERS entry uses dmb")
    if alias is None and len(ours) > 1:
        raise InspectError(
            EXIT_USAGE,
            f"several CHANNEL_LAYERS entries use dmb ({', '.join(sorted(ours))}); "
            f"choose one with --alias",
        )
    if alias is None:
        alias = next(iter(ours))
    if alias not in ours:
        raise InspectError(
            EXIT_USAGE,
            f"CHANNEL_LAYERS has no dmb entry {alias!r} (dmb entries: "
            f"{', '.join(sorted(ours))})",
        )
    try:
        return validate_config(ours[alias].get("CONFIG") or {})
    except ConfigError as exc:
        raise InspectError(EXIT_USAGE, f"CHANNEL_LAYERS[{alias!r}]: {exc}") from None


# Running.


def main(argv=None, channel_layers=None, prog=None, stdout=None, stderr=None):
    """Run the tool; returns the exit code.

    ``channel_layers`` (from ``manage.py dmb inspect``) is used when no
    target is named; ``--list`` still lists every segment.
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
        _check_usage(parser, args, channel_layers)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return _run(args, channel_layers, out)
    except InspectError as exc:
        return _fail(args, exc.code, str(exc), out, err, parser.prog)
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        # Ctrl-C is how --watch ends; anywhere else the work was not done,
        # and a script must not take a --purge that never ran for success.
        err.write(f"{parser.prog}: interrupted\n")
        return EXIT_INTERRUPTED


def _fail(args, code, message, out, err, prog):
    err.write(f"{prog}: {message}\n")
    if args.json:
        document = {
            "schema": SCHEMA,
            "view": "error",
            "exit_code": code,
            "error": message,
        }
        out.write(json.dumps(document) + "\n")
    return code


def _run(args, channel_layers, out):
    name = target_name(args, channel_layers)
    if name is None and args.members:
        raise InspectError(EXIT_USAGE, "--members needs a segment (--prefix, --name)")
    if name is None and (args.peek or args.purge or args.unlink):
        raise InspectError(EXIT_USAGE, "name a segment: --prefix, --name or --settings")
    if args.unlink:
        return unlink(name, args, out)
    if args.watch:
        return Watch(name, args, out).run()
    if name is None:
        return _show_list(args, out)
    reader = guarded(lambda: SegmentReader(name), args.timeout, name, f"open {name}")
    with reader:
        if args.peek:
            return _show_peek(reader, args, out)
        if args.purge:
            return _purge(reader, args, out)
        document = guarded(
            lambda: segment_document(reader, args.members), args.timeout, name
        )
        return _emit_segment(document, args, out)


def _show_list(args, out):
    document = list_document(args.timeout)
    if args.prometheus:
        ok = [d["name"] for d in document["segments"] if d["status"] == "ok"]
        broken = [d["name"] for d in document["segments"] if d["status"] != "ok"]
        documents = [_read_for_metrics(name, args.timeout) for name in ok]
        good = [d for d in documents if d is not None]
        gone = [n for n, d in zip(ok, documents) if d is None]
        _write(out, render_prometheus(good, broken + gone))
    elif args.json:
        _write_json(out, document)
    else:
        _write(out, render_list(document))
    return EXIT_OK


def _read_for_metrics(name, timeout):
    def read():
        with SegmentReader(name) as reader:
            return segment_document(reader)

    try:
        return guarded(read, timeout, name)
    except InspectError:
        return None


def _emit_segment(document, args, out):
    if args.prometheus:
        _write(out, render_prometheus([document]))
    elif args.json:
        _write_json(out, document)
    else:
        _write(out, render_segment(document, args.limit))
    return EXIT_OK


def _show_peek(reader, args, out):
    document = guarded(
        lambda: peek_document(reader, args.peek, args.n, args.bytes),
        args.timeout,
        reader.name,
    )
    if args.json:
        _write_json(out, document)
    else:
        _write(out, render_peek(document))
    return EXIT_OK


def _purge(reader, args, out):
    purged = guarded(lambda: reader.purge(args.purge), args.timeout, reader.name)
    logger.info("purged %d messages from %r in %s", purged, args.purge, reader.name)
    if args.json:
        _write_json(
            out,
            {
                "schema": SCHEMA,
                "view": "purge",
                "segment": reader.name,
                "channel": args.purge,
                "purged": purged,
            },
        )
    else:
        dropped = _count(purged, "message")
        _write(out, [f"purged {dropped} from {args.purge!r} in {reader.name}"])
    return EXIT_OK


def unlink(name, args, out):
    """Remove a segment; refused while live processes use it, unless forced."""
    live = _live_processes(name, args)
    if live and not args.force:
        pids = ", ".join(str(p["pid"]) for p in live)
        raise InspectError(
            EXIT_REFUSED,
            f"refused: {_count(len(live), 'live process is', 'live processes are')} "
            f"attached to {name} ({'pid' if len(live) == 1 else 'pids'} {pids}); "
            f"stop them first, or add --force: the attached processes "
            f"go on using the removed segment among themselves, and processes "
            f"started afterwards make a new one",
        )
    try:
        removed = seg.unlink_segment(name)
    except (PermissionError, posix_ipc.PermissionsError):
        st = _stat_or_none(seg.segment_path(name))
        owner = _user(st.st_uid) if st else "another user"
        raise InspectError(
            EXIT_PERMISSION,
            f"permission denied: cannot remove {name}, which belongs to {owner}; "
            f"run as that user",
        )
    if not removed:
        raise _missing(name)
    logger.info("removed segment %s", name)
    if args.json:
        document = {
            "schema": SCHEMA,
            "view": "unlink",
            "segment": name,
            "removed": True,
            "live_processes": [p["pid"] for p in live],
        }
        _write_json(out, document)
    else:
        _write(out, [f"removed {name}"])
    return EXIT_OK


_STATUS_WORDS = {
    "not_dmb": "it is not a dmb segment",
    "other_version": "it has another layout version",
    "uninitialised": "it was never initialised",
    "damaged": "it is damaged",
    "locked": "its lock stays taken",
}


def _live_processes(name, args):
    """The live processes attached to the segment, for --unlink."""

    def read():
        with SegmentReader(name) as reader:
            return [p for p in reader.slots() if _alive(p)]

    try:
        return guarded(read, args.timeout, name, f"open {name}")
    except InspectError as exc:
        if exc.code == EXIT_NO_SEGMENT:
            raise
        if args.force:
            return []  # the unlink itself says whether this user may
        if exc.code == EXIT_PERMISSION:
            raise
        raise InspectError(
            EXIT_REFUSED,
            f"refused: {name} cannot be read ({_STATUS_WORDS[exc.status]}), so "
            f"which processes use it is unknown; add --force to remove it anyway",
        ) from None


def _write(out, lines):
    out.write("\n".join(lines) + "\n")
    out.flush()


def _write_json(out, document, indent=2):
    out.write(json.dumps(document, indent=indent, ensure_ascii=False) + "\n")
    out.flush()


class Watch:
    """The live view: redraw in place, like top, until Ctrl-C."""

    def __init__(self, name, args, out):
        self.name = name
        self.args = args
        self.out = out
        self.tty = out.isatty() and not args.json and not args.prometheus
        self.reader = None
        self.previous = None

    def run(self):
        if self.tty:
            self.out.write(_ALT_SCREEN_ON + _HOME_CLEAR)
        try:
            while True:
                self._frame()
                time.sleep(self.args.watch)
        except KeyboardInterrupt:
            return EXIT_OK
        finally:
            if self.reader is not None:
                self.reader.close()
            if self.tty:
                self.out.write(_ALT_SCREEN_OFF)
                self.out.flush()

    def _frame(self):
        try:
            document, lines = self._read()
        except InspectError as exc:
            document = {
                "schema": SCHEMA,
                "view": "error",
                "exit_code": exc.code,
                "error": str(exc),
            }
            lines = [f"{self.name or 'dmb segments'}: {exc}"]
        if self.args.json:
            self.out.write(json.dumps(document, ensure_ascii=False) + "\n")
        elif self.args.prometheus:
            self.out.write("\n".join(lines) + "\n\n")
        elif self.tty:
            self._draw(lines)
        else:
            self.out.write("\n".join(lines) + "\n\n")
        self.out.flush()

    def _read(self):
        if self.name is None:
            document = list_document(self.args.timeout)
            return document, self._titled(render_list(document))
        if self.reader is not None and self.reader.replaced:
            self.reader.close()
            self.reader = None
        if self.reader is None:
            self.reader = self._guarded(lambda: SegmentReader(self.name))
            self.previous = None
        document = self._guarded(
            lambda: segment_document(self.reader, self.args.members)
        )
        add_rates(document, self.previous)
        self.previous = document
        if self.args.prometheus:
            return document, render_prometheus([document])
        return document, self._fit(document)

    def _guarded(self, function):
        return guarded(function, self.args.timeout, self.name)

    def _titled(self, lines):
        clock = time.strftime("%H:%M:%S")
        title = f"dmb.inspect  every {self.args.watch:g}s  {clock}  (Ctrl-C quits)"
        return [title] + lines

    def _fit(self, document):
        """The frame, its tables cut to the most rows that fit the terminal."""

        def render(limit):
            return self._titled(render_segment(document, limit, live=True))

        if self.args.limit or not self.tty:
            return render(self.args.limit)
        rows = shutil.get_terminal_size((100, 40)).lines
        lines = render(None)
        if len(lines) <= rows:
            return lines
        tables = [document[t] for t in ("processes", "channels", "groups")]
        if document["members"] is not None:
            tables.append(document["members"]["members"])
        low, high = 1, max(len(table) for table in tables)
        while low < high:  # the largest limit whose frame fits
            middle = (low + high + 1) // 2
            if len(render(middle)) <= rows:
                low = middle
            else:
                high = middle - 1
        return render(low)

    def _draw(self, lines):
        """Overwrite the screen from the top; the last line ends unbroken, so
        a frame of exactly the terminal's height does not scroll it."""
        columns, rows = shutil.get_terminal_size((100, 40))
        if len(lines) > rows:
            cut = len(lines) - (rows - 1)
            lines = lines[: rows - 1] + [f"... {cut} more lines (enlarge the terminal)"]
        lines = [line[:columns] for line in lines]
        self.out.write(
            _HOME + (_ERASE_LINE + "\n").join(lines) + _ERASE_LINE + _ERASE_BELOW
        )


def exit(code):
    """Leave the process with ``code``, skipping the interpreter's teardown.

    The tool holds no slot and writes nothing but its output, so there is
    nothing to tear down; and a read thread still in the segment (stuck in
    its lock, or cut off by Ctrl-C) must not have the segment unmapped
    under it, as teardown would.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit(main())
