"""A kombu transport over a dmb segment: Celery with no broker process.

Celery's queues, acknowledgements and bindings live in the shared-memory
segment of a ``prefix``, beside the Channels layer of the same prefix::

    import dmb.kombu  # teaches kombu the dmb:// scheme

    app = Celery("mysite", broker="dmb://mysite")

``broker_transport = "dmb.kombu:Transport"`` does the same without the
import.  docs/celery.md has the settings, the guarantees and the limits.

What the transport keeps in the segment, under names that start with
``kombu:``, which no Channels name can (so the two never meet):

    kombu:q:<queue>           the ready messages of a queue
    kombu:u:<owner>:<queue>   messages delivered to one consumer channel and
                              not acknowledged yet: its pending channel
    kombu:x:<exchange>        the bindings of an exchange, one record each

``<owner>`` names a consumer channel: its transport's slot, the slot's
generation and the kombu channel id, in hex (``3.1a.1``).  A queue or
exchange name too long for a channel name, or one with a ``!``, is
replaced by ``#`` and a hash of it.

A consumer takes a message by moving it from the queue into its pending
channel in one locked step (``dmb_move``); an acknowledgement drops it
from there and a rejection moves it back (``dmb_settle``).  When the
consumer's process dies, any process of the transport that notices (at
least every ``recover_interval`` seconds, and whenever a consumer starts)
moves its pending messages back to their queues.  A slot names a process
by pid and start time, so a reused pid is not taken for the dead one.

Waiting costs nothing: a consumer that finds its queues empty marks its
slot waiting on them in that same step, and waits on its slot's FIFO,
which a sender writes to (in kombu's event loop with ``add_reader``, and
in ``drain_events`` with ``poll``).
"""

import atexit
import collections
import hashlib
import itertools
import logging
import math
import os
import secrets
import select
import socket
import sys
import threading
import time
import urllib.parse
import weakref
from queue import Empty

import msgpack
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.utils import json as kombu_json
from kombu.utils.uuid import uuid

from . import __version__
from . import segment as seg
from ._ring_cffi import ffi, lib
from .errors import ConfigError, SegmentCorrupt, SegmentError, SegmentFull
from .layer import DEFAULT_SIZE, validate_config
from .layer import _Scratch as _LayerScratch
from .wakeup import Doorbell, Ringer

logger = logging.getLogger(__name__)

SCHEME = "dmb"
#: The Channels layer's default prefix, so both defaults share a segment.
DEFAULT_PREFIX = "asgi"
DEFAULT_RECOVER_INTERVAL = 5.0

NAMESPACE = "kombu:"
QUEUE = NAMESPACE + "q:"
PENDING = NAMESPACE + "u:"
EXCHANGE = NAMESPACE + "x:"

#: Longest queue or exchange name kept as it is inside a channel name: the
#: pending channel's name adds at most 25 bytes to it, under the 99 allowed.
KEY_MAX = 64
#: No capacity: a queue holds what the segment has room for.
CAPACITY = 0xFFFFFFFF
NO_DEADLINE = (1 << 64) - 1

_NS = 1_000_000_000
_SCAN_STEPS = 512  # channel entries looked at per hold of the lock
_FIRST_BUFFER = 64 * 1024  # as the layer's: receive buffers start here
_PUMP_BATCH = 64  # messages one event-loop tick delivers at most
_CLAIM = "dmb.claim"  # payload key of a delivery's claim, never stored
_ALL_REASONS = lib.DMB_NONE.to_bytes(4, sys.byteorder)  # "look at everything"

_FULL = (
    lib.DMB_ERR_NOSPACE,
    lib.DMB_ERR_CHANNELS,
    lib.DMB_ERR_GROUPS,
    lib.DMB_ERR_MEMBERS,
)


def name_key(name):
    """The part of a channel name that stands for a queue or exchange name."""
    raw = name.encode()
    if len(raw) <= KEY_MAX and b"!" not in raw and not raw.startswith(b"#"):
        return name
    return "#" + hashlib.blake2b(raw, digest_size=16).hexdigest()


def queue_channel(queue):
    return (QUEUE + name_key(queue)).encode()


def exchange_channel(exchange):
    return (EXCHANGE + name_key(exchange)).encode()


# Messages are msgpack, which carries bytes as they are; the types kombu's
# JSON knows (datetime, Decimal, UUID...) travel in its tagged form.

_json_default = kombu_json.JSONEncoder().default
_packers = threading.local()


def pack(value):
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(
            use_bin_type=True, autoreset=True, default=_json_default
        )
    return packer.pack(value)


def unpack(data):
    return msgpack.unpackb(
        data, raw=False, strict_map_key=False, object_hook=kombu_json.object_hook
    )


# ---------------------------------------------------------------------------
# Attaching: one mapping per segment and process, slots taken on demand.

_segments = {}
_segments_lock = threading.Lock()
_slots = weakref.WeakSet()


def _segment(name, size, mode):
    """This process's mapping of a segment, made on first use.

    A mapping stays valid across ``fork``, so children share it; only
    slots belong to one process.
    """
    with _segments_lock:
        found = _segments.get(name)
        if found is None or found.closed:
            if size is None:
                size = _existing_size(name) or DEFAULT_SIZE
            found = _segments[name] = seg.Segment(name, size, mode)
        return found


def _existing_size(name):
    """The size of a segment that exists already (so asking for it does
    not warn that the configured size differs), or None."""
    try:
        return os.stat(seg.segment_path(name)).st_size or None
    except OSError:
        return None


class _Slot:
    """A process slot of this process in a segment, with its wake-up FIFO."""

    def __init__(self, segment, mode):
        self.segment = segment
        self.pid = os.getpid()
        self.released = False
        self.token = secrets.randbits(62) | 1
        self.doorbell = Doorbell(seg.wake_path(segment.name, self.token), mode)
        try:
            index, self.gen = seg.acquire_slot(
                segment.handle,
                segment.name,
                self.token,
                secrets.token_hex(8).encode(),
                lambda: reclaim_dead_slots(segment),
            )
        except BaseException:
            self.doorbell.close()
            raise
        if index < 0:
            self.doorbell.close()
            raise SegmentError(
                f"segment {segment.name!r} refused a process slot (code {index})"
            )
        self.index = index
        self.owner = f"{index:x}.{self.gen:x}"
        self._poll = select.poll()
        self._poll.register(self.doorbell.fd, select.POLLIN)
        _slots.add(self)

    @property
    def current(self):
        """Is this slot this process's (not inherited across fork)?"""
        return not self.released and self.pid == os.getpid()

    def wait(self, timeout):
        """Wait until the FIFO is rung or timeout (seconds; None: forever)."""
        ms = -1 if timeout is None else max(0, math.ceil(timeout * 1000))
        try:
            ready = self._poll.poll(ms)
        except InterruptedError:
            ready = ()
        self.doorbell.take_reasons()
        return bool(ready)

    def release(self):
        """Give the slot back; in a forked child, only drop our copy."""
        if self.released:
            return
        self.released = True
        if self.pid == os.getpid():
            lib.dmb_slot_release(self.segment.handle, self.index, self.gen)
            self.doorbell.close()
        else:
            self.doorbell.close(unlink=False)


_senders = {}
_senders_lock = threading.Lock()


def _sender_slot(segment, mode):
    """The slot a process's sending-only connections share."""
    with _senders_lock:
        found = _senders.get(segment.name)
        if found is None or not found.current:
            found = _senders[segment.name] = _Slot(segment, mode)
        return found


def reclaim_dead_slots(segment):
    """Reclaim the slots of processes that died without leaving."""
    info = ffi.new("struct dmb_slot_info *")
    for slot in range(lib.DMB_MAX_SLOTS):
        lib.dmb_slot_info(segment.handle, slot, info)
        if info.in_use:
            _reclaim_if_dead(segment, slot, info)


def _running(pid, start_time):
    """Is the process (pid, start_time) alive?  This one is, without a look
    at /proc, unless the pid is ours but the start time another's."""
    if pid == os.getpid() and start_time == _own_start_time():
        return True
    return seg.process_alive(pid, start_time)


_start_times = {}


def _own_start_time():
    pid = os.getpid()
    if pid not in _start_times:
        _start_times.clear()
        _start_times[pid] = seg.process_start_time(pid)
    return _start_times[pid]


def _reclaim_if_dead(segment, slot, info):
    pid, start_time, token = info.pid, info.start_time, info.token
    if _running(pid, start_time):
        return False
    if lib.dmb_slot_reclaim(segment.handle, slot, pid, start_time) != 1:
        return False
    try:
        os.unlink(seg.wake_path(segment.name, token))
    except FileNotFoundError:
        pass
    logger.info(
        "segment %s: reclaimed slot %d of process %d, which died without leaving",
        segment.name,
        slot,
        pid,
    )
    return True


def _release_at_exit():
    for slot in list(_slots):
        try:
            slot.release()
        except Exception:  # the interpreter is going: never block that
            logger.debug("slot release at exit failed", exc_info=True)


atexit.register(_release_at_exit)


# ---------------------------------------------------------------------------
# The segment operations the transport needs.


class _Scratch(_LayerScratch):
    """The layer's per-thread out-parameters, and those moves need."""

    def __init__(self):
        super().__init__()
        self.ref = ffi.new("struct dmb_ref *")
        self.sent = ffi.new("uint64_t *")
        self.pos = ffi.new("uint32_t *")
        self.info = ffi.new("struct dmb_channel_info *")
        self.grow(_FIRST_BUFFER)


class SegmentClient:
    """One kombu connection's use of a segment.

    Sending needs no slot of its own (it borrows the process's sender
    slot); taking messages and waiting use the connection's own slot,
    taken on first use, whose identity names its pending channels.
    """

    def __init__(self, prefix, size=None, mode=0o600):
        self.prefix = prefix
        self.mode = mode
        self.name = seg.segment_name(prefix)
        self.segment = _segment(self.name, size, mode)
        self.h = self.segment.handle
        self.recover_due = False
        self._slot = None
        self._slot_lock = threading.Lock()
        self._ringer = Ringer(lambda token: seg.wake_path(self.name, token))
        self._ringer_pid = os.getpid()
        self._local = threading.local()

    def slot(self):
        """This connection's slot in this process, taken on first use."""
        slot = self._slot
        if slot is None or not slot.current:
            with self._slot_lock:
                if self._slot is None or not self._slot.current:
                    self._slot = _Slot(self.segment, self.mode)
                slot = self._slot
        return slot

    def _sender(self):
        slot = self._slot
        if slot is not None and slot.current:
            return slot.index
        return _sender_slot(self.segment, self.mode).index

    def close(self):
        """Give back this connection's slot (not in a forked child)."""
        if self._slot is not None:
            self._slot.release()
            self._slot = None
        if self._ringer_pid == os.getpid():
            self._ringer.close()

    def _scratch(self):
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = _Scratch()
        return scratch

    # Sending and taking.

    def send(self, channel, data, deadline=NO_DEADLINE):
        wake = self._scratch().wake
        rc = self._retrying(
            lambda now: lib.dmb_send(
                self.h,
                self._sender(),
                channel,
                len(channel),
                CAPACITY,
                data,
                len(data),
                now,
                deadline,
                wake,
            )
        )
        self._check(rc, f"send to {channel.decode()!r}")
        self._ring(wake)

    def take(self, src, pending, flags):
        """Take the head message of src: ``(data, ref)``, or None if empty.

        With ``pending`` the message moves there, in the same locked step,
        until it is settled by ``ref``; without, it is gone (ref is None).
        ``flags`` are dmb_recv's: wait on src if it is empty, or stop.
        """
        scratch = self._scratch()
        slot = self.slot().index
        while True:
            rc = self._retrying(
                lambda now: self._take(slot, src, pending, flags, now, scratch)
            )
            if rc != lib.DMB_ERR_TOOBIG:
                break
            scratch.grow(scratch.len[0])
        self._check(rc, f"take from {src.decode()!r}")
        if rc == 0:
            return None
        data = bytes(ffi.buffer(scratch.buf, scratch.len[0]))
        if pending is None:
            return data, None
        return data, (scratch.ref.node, scratch.ref.stamp)

    def _take(self, slot, src, pending, flags, now, scratch):
        if pending is None:
            return lib.dmb_recv(
                self.h, slot, src, len(src), CAPACITY, now, flags,
                scratch.buf, scratch.buf_len, scratch.len,
            )  # fmt: skip
        return lib.dmb_move(
            self.h, slot, src, len(src), pending, len(pending), CAPACITY, now,
            flags, scratch.buf, scratch.buf_len, scratch.len, scratch.ref,
            scratch.wake,
        )  # fmt: skip

    def settle(self, pending, ref, dst=None):
        """Drop a pending delivery (dst None) or move it to dst.

        Returns False if it was not there (settled already).
        """
        scratch = self._scratch()
        scratch.ref.node, scratch.ref.stamp = ref
        dst_len = 0 if dst is None else len(dst)
        rc = self._retrying(
            lambda now: lib.dmb_settle(
                self.h,
                self._sender(),
                pending,
                len(pending),
                scratch.ref,
                ffi.NULL if dst is None else dst,
                dst_len,
                CAPACITY,
                now,
                scratch.wake,
            )
        )
        self._check(rc, f"settle a delivery of {pending.decode()!r}")
        self._ring(scratch.wake)
        return rc == 1

    def move_all(self, src, dst):
        """Move every message of src to the tail of dst; returns how many."""
        scratch = self._scratch()
        moved = 0
        while True:
            rc = self._retrying(
                lambda now: lib.dmb_move(
                    self.h, self._sender(), src, len(src), dst, len(dst),
                    CAPACITY, now, 0, ffi.NULL, 0, scratch.len, scratch.ref,
                    scratch.wake,
                )
            )  # fmt: skip
            self._check(rc, f"move {src.decode()!r} to {dst.decode()!r}")
            if rc == 0:
                return moved
            moved += 1
            self._ring(scratch.wake)

    def unwait(self, channel):
        slot = self._slot
        if slot is not None and slot.current:
            lib.dmb_unwait(self.h, slot.index, channel, len(channel))

    # Looking.

    def depth(self, channel):
        """Messages queued on a channel, or None if it has no entry."""
        info = self._scratch().info
        rc = lib.dmb_channel_find(self.h, channel, len(channel), info)
        self._check(rc, f"look at {channel.decode()!r}")
        return info.depth if rc == 1 else None

    def purge(self, channel):
        rc = lib.dmb_purge(self.h, channel, len(channel))
        self._check(rc, f"purge {channel.decode()!r}")
        return max(rc, 0)

    def records(self, channel):
        """Every message of a channel, not taken (a binding table)."""
        return peek_all(self.h, channel, self._scratch())

    def add_record(self, channel, record):
        # Two processes adding the same record at once may both add it:
        # readers take a table as a set, and removal removes every copy.
        if record not in self.records(channel):
            self.send(channel, record)

    def remove_record(self, channel, record):
        while True:
            rc = lib.dmb_remove(self.h, channel, len(channel), record, len(record))
            self._check(rc, f"remove a record of {channel.decode()!r}")
            if rc == 0:
                return

    def channels(self, prefix):
        """Names of the channels whose names start with prefix (a snapshot)."""
        return [name for name, _ in scan(self.h, prefix, self._scratch())]

    # Waking, dead processes, errors.

    def _ring(self, wake):
        mask = wake.mask[0] | (wake.mask[1] << 64)
        if not mask:
            return
        if self._ringer_pid != os.getpid():
            self._ringer = Ringer(lambda token: seg.wake_path(self.name, token))
            self._ringer_pid = os.getpid()
        info = self._scratch().slot_info
        while mask:
            low = mask & -mask
            mask ^= low
            slot = low.bit_length() - 1
            lib.dmb_slot_info(self.h, slot, info)
            if not info.in_use or self._ringer.ring(info.token, wake.channel):
                continue
            self._ringer.forget(info.token)
            if _reclaim_if_dead(self.segment, slot, info):
                self.recover_due = True

    def owner_alive(self, slot, gen, cache):
        """Does slot still hold generation gen, for a live process?"""
        key = (slot, gen)
        if key in cache:
            return cache[key]
        info = self._scratch().slot_info
        alive = False
        if 0 <= slot < lib.DMB_MAX_SLOTS:
            lib.dmb_slot_info(self.h, slot, info)
            alive = bool(info.in_use) and info.gen == gen
            if alive and not _running(info.pid, info.start_time):
                _reclaim_if_dead(self.segment, slot, info)
                alive = False
        cache[key] = alive
        return alive

    def _retrying(self, operation):
        """Run a C operation; on a full store or damage, mend and retry once.

        ``operation(now)`` must change nothing when it fails.
        """
        rc = operation(time.monotonic_ns())
        if rc in (lib.DMB_ERR_NOSPACE, lib.DMB_ERR_CHANNELS):
            now = time.monotonic_ns()
            lib.dmb_expire(self.h, now, NO_DEADLINE)
            reclaim_dead_slots(self.segment)
            rc = operation(now)
        elif rc == lib.DMB_ERR_CORRUPT:
            self._repair()
            rc = operation(time.monotonic_ns())
        return rc

    def _repair(self):
        logger.error("segment %s is damaged; repairing it", self.name)
        lib.dmb_repair(self.h)

    def _check(self, rc, what):
        """The one place a C error code becomes an exception, here."""
        if rc >= 0:
            return
        name = self.name
        if rc in _FULL:
            raise SegmentFull(
                f"{what}: segment {name!r} is full; drain or purge its queues "
                f"(python -m dmb.inspect --name {name}), or raise the size "
                f"(dmb://{self.prefix}?size=...) and remove the segment so it "
                f"is made anew"
            )
        if rc == lib.DMB_ERR_CORRUPT:
            raise SegmentCorrupt(
                f"{what}: segment {name!r} is damaged and repair did not mend "
                f"it; stop its processes and remove it (python -m dmb.inspect "
                f"--unlink --force --name {name})"
            )
        if rc == lib.DMB_ERR_INVAL:
            raise SegmentError(f"{what}: refused by segment {name!r} (bad name)")
        raise SegmentError(f"{what}: segment {name!r} refused it (code {rc})")


def peek_all(h, channel, scratch=None):
    """Every message of a channel as bytes, oldest first, none taken."""
    scratch = scratch or _Scratch()
    found = []
    while True:
        rc = lib.dmb_peek(
            h, channel, len(channel), len(found), scratch.buf, scratch.buf_len,
            scratch.len, scratch.sent,
        )  # fmt: skip
        if rc == lib.DMB_ERR_TOOBIG:
            scratch.grow(scratch.len[0])
            continue
        if rc < 0:
            raise SegmentError(f"cannot read channel {channel!r} (code {rc})")
        if rc == 0:
            return found
        found.append(bytes(ffi.buffer(scratch.buf, scratch.len[0])))


def scan(h, prefix, scratch=None):
    """(name, info) of each channel whose name starts with prefix.

    Each step holds the lock for at most _SCAN_STEPS entries; the entries
    are copied, so the result is a snapshot that may be stale by the time
    it is read.
    """
    scratch = scratch or _Scratch()
    raw = prefix.encode()
    pos = scratch.pos
    pos[0] = 0
    found = []
    while pos[0] < h.geo.channels:
        rc = lib.dmb_channel_scan(h, pos, raw, len(raw), _SCAN_STEPS)
        if rc < 0:
            raise SegmentError(f"cannot scan the channels (code {rc})")
        if rc == 1:
            info = ffi.new("struct dmb_channel_info *")
            if lib.dmb_channel_at(h, pos[0], info) == 1:
                name = ffi.string(info.name).decode(errors="replace")
                if name.startswith(prefix):
                    found.append((name, info))
            pos[0] += 1
    return found


def _parse_pending(name):
    """(slot, gen, key) from a pending channel's name, or None."""
    owner, sep, key = name[len(PENDING) :].partition(":")
    parts = owner.split(".")
    if not sep or len(parts) != 3:
        return None
    try:
        return int(parts[0], 16), int(parts[1], 16), key
    except ValueError:
        return None


def _parse_owner(owner):
    slot, _, gen = owner.partition(".")
    try:
        return int(slot, 16), int(gen, 16)
    except ValueError:
        return None


def _binding(record):
    """A binding record as (exchange, type, routing_key, queue, owner)."""
    try:
        value = unpack(record)
        exchange, kind, routing_key, queue, owner = value
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    return exchange, kind, routing_key, queue, owner


def recover(client):
    """Give dead consumers' messages back to their queues, and drop what
    dead processes owned: bindings of their auto-delete queues, and those
    queues once nothing binds them.  Returns the messages moved back."""
    alive = {}
    moved = 0
    for name in client.channels(NAMESPACE):
        if name.startswith(PENDING):
            moved += _recover_pending(client, name, alive)
        elif name.startswith(EXCHANGE):
            _drop_dead_bindings(client, name.encode(), alive)
    return moved


def _recover_pending(client, name, alive):
    parsed = _parse_pending(name)
    if parsed is None:
        return 0
    slot, gen, key = parsed
    if client.owner_alive(slot, gen, alive):
        return 0
    moved = client.move_all(name.encode(), (QUEUE + key).encode())
    if moved:
        logger.info(
            "segment %s: %d unacknowledged message(s) of a consumer that died "
            "went back to queue %r",
            client.name,
            moved,
            key,
        )
    return moved


def _drop_dead_bindings(client, table, alive):
    records = client.records(table)
    dead = []
    for record in records:
        binding = _binding(record)
        owner = binding and binding[4] and _parse_owner(binding[4])
        if owner and not client.owner_alive(owner[0], owner[1], alive):
            dead.append((record, binding[3]))
    _drop_bindings(client, table, dead)


def _drop_bindings(client, table, dropped):
    """Remove binding records, and purge each queue nothing binds now."""
    for record, _ in dropped:
        client.remove_record(table, record)
    if not dropped:
        return
    still = {b[3] for b in map(_binding, client.records(table)) if b}
    for queue in {queue for _, queue in dropped} - still:
        client.purge(queue_channel(queue))


# ---------------------------------------------------------------------------
# kombu's virtual transport, over the segment.


_Claim = collections.namedtuple("_Claim", "pending ref queue")


class Message(virtual.Message):
    """A delivered message; ``claim`` says where it waits to be settled."""

    def __init__(self, payload, channel=None, **kwargs):
        self.claim = payload.pop(_CLAIM, None)
        super().__init__(payload, channel=channel, **kwargs)


class QoS(virtual.QoS):
    """Unacknowledged deliveries of one channel, settled in the segment.

    The messages themselves wait in the channel's pending channels, so
    nothing here is needed to get them back if this process dies.
    """

    def can_consume(self):
        limit = self.prefetch_count
        return not limit or len(self._delivered) < limit

    def can_consume_max_estimate(self):
        if self.prefetch_count:
            return max(self.prefetch_count - len(self._delivered), 0)

    def append(self, message, delivery_tag):
        self._delivered[delivery_tag] = message

    def ack(self, delivery_tag):
        message = self._delivered.pop(delivery_tag, None)
        if message is not None:
            self.channel._settle(message, requeue=False)

    def reject(self, delivery_tag, requeue=False):
        message = self._delivered.pop(delivery_tag, None)
        if message is not None:
            self.channel._settle(message, requeue=requeue)

    def restore_unacked(self):
        errors = []
        if not self.channel._ours():
            self._delivered.clear()  # inherited across fork: the parent's
            return errors
        while self._delivered:
            _, message = self._delivered.popitem()
            try:
                self.channel._settle(message, requeue=True)
            except Exception as exc:
                errors.append((exc, message))
        return errors


class Channel(virtual.Channel):
    """One kombu channel: its queues are segment channels, its bindings
    shared records, its unacknowledged messages a pending channel per
    queue."""

    QoS = QoS
    Message = Message
    supports_fanout = True
    #: msgpack carries bytes as they are, so bodies need no base64.
    body_encoding = None

    def __init__(self, connection, **kwargs):
        super().__init__(connection, **kwargs)
        self._pid = os.getpid()
        self._no_ack = {}  # queue -> consumed without acknowledgements?
        self._deliver_to = {}  # queue -> kombu's callback for a payload
        self._pending = {}  # queue -> pending channel name

    @property
    def _segment(self):
        return self.connection.client_segment()

    def _ours(self):
        """Was this channel made in this process (not inherited by fork)?"""
        return self._pid == os.getpid()

    # Consuming.

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        self._no_ack[queue] = no_ack
        self._deliver_to[queue] = self.connection._callbacks[queue]
        self.connection._consumer_started()

    def basic_cancel(self, consumer_tag):
        queue = self._tag_to_queue.get(consumer_tag)
        super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._no_ack.pop(queue, None)
            self._deliver_to.pop(queue, None)

    def basic_get(self, queue, no_ack=False, **kwargs):
        payload = self._take(queue, no_ack, 0)
        if payload is None:
            return None
        message = self.Message(payload, channel=self)
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def _take_one(self, queue, flags):
        """Deliver the next message of a consumed queue; False if empty."""
        payload = self._take(queue, self._no_ack.get(queue, True), flags)
        if payload is None:
            return False
        self._deliver_to[queue](payload)
        return True

    def _take(self, queue, no_ack, flags):
        src = queue_channel(queue)
        pending = None if no_ack else self._pending_channel(queue)
        taken = self._segment.take(src, pending, flags)
        if taken is None:
            return None
        data, ref = taken
        payload = unpack(data)
        if ref is not None:
            # A tag of this delivery alone: a message fanned out to two
            # queues of one channel arrives twice with one publish tag.
            payload["properties"]["delivery_tag"] = f"{ref[0]:x}.{ref[1]:x}"
            payload[_CLAIM] = _Claim(pending, ref, src)
        return payload

    def _pending_channel(self, queue):
        owner = self._segment.slot().owner
        name = self._pending.get(queue)
        if name is None or not name.startswith(f"{PENDING}{owner}.".encode()):
            key = name_key(queue)
            name = f"{PENDING}{owner}.{self.channel_id:x}:{key}".encode()
            self._pending[queue] = name
        return name

    def _get(self, queue, timeout=None):
        payload = self._take(queue, True, 0)
        if payload is None:
            raise Empty()
        return payload

    def _settle(self, message, requeue):
        claim = getattr(message, "claim", None)
        if claim is None or not self._ours():
            return  # taken without acknowledgement, or the parent's to settle
        self._segment.settle(claim.pending, claim.ref, claim.queue if requeue else None)

    def _restore(self, message):
        self._settle(message, requeue=True)

    def _restore_at_beginning(self, message):
        self._settle(message, requeue=True)

    # Publishing.

    def _put(self, queue, message, **kwargs):
        self._segment.send(queue_channel(queue), pack(message), _deadline(message))

    def _put_fanout(self, exchange, message, routing_key, **kwargs):
        data, deadline = pack(message), _deadline(message)
        for queue in {queue for _, _, queue in self.get_table(exchange)}:
            self._segment.send(queue_channel(queue), data, deadline)

    # Queues.

    def queue_declare(self, queue=None, passive=False, **kwargs):
        queue = queue or f"amq.gen-{uuid()}"
        if not passive and (kwargs.get("auto_delete") or kwargs.get("exclusive")):
            self.connection._owned_queues.add(queue)
        return super().queue_declare(queue, passive, **kwargs)

    def queue_delete(self, queue, if_unused=False, if_empty=False, **kwargs):
        if if_empty and self._size(queue):
            return
        for name in self._segment.channels(EXCHANGE):
            table = name.encode()
            for record in self._segment.records(table):
                binding = _binding(record)
                if binding and binding[3] == queue:
                    self._segment.remove_record(table, record)
        self._purge(queue)
        self.state.queue_bindings_delete(queue)
        self.connection._forget_owned(queue)

    def _has_queue(self, queue, **kwargs):
        return self._segment.depth(queue_channel(queue)) is not None or bool(
            self.state.queue_index.get(queue)
        )

    def _size(self, queue):
        return self._segment.depth(queue_channel(queue)) or 0

    def _purge(self, queue):
        return self._segment.purge(queue_channel(queue))

    # Exchanges and bindings, shared through the segment.

    def exchange_declare(self, exchange=None, type="direct", passive=False, **kw):
        known = exchange in self.state.exchanges
        if passive and not known and self._shared_type(exchange) is not None:
            return None
        return super().exchange_declare(exchange, type, passive=passive, **kw)

    def exchange_delete(self, exchange, if_unused=False, nowait=False):
        super().exchange_delete(exchange, if_unused=if_unused, nowait=nowait)
        self._segment.purge(exchange_channel(exchange))

    def queue_bind(self, queue, exchange=None, routing_key="", arguments=None, **kw):
        exchange = exchange or "amq.direct"
        if exchange not in self.state.exchanges:
            self.exchange_declare(exchange, self.typeof(exchange).type)
        return super().queue_bind(queue, exchange, routing_key, arguments, **kw)

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        owner = self.connection._owner_of(queue)
        kind = self.typeof(exchange).type
        record = pack([exchange, kind, routing_key, queue, owner])
        table = exchange_channel(exchange)
        self._segment.add_record(table, record)
        if owner:
            self.connection._owned_bindings.setdefault(queue, set()).add(
                (table, record)
            )

    def queue_unbind(self, queue, exchange=None, routing_key="", arguments=None, **kw):
        super().queue_unbind(queue, exchange, routing_key, arguments, **kw)
        table = exchange_channel(exchange or "amq.direct")
        for record in self._segment.records(table):
            binding = _binding(record)
            if binding and binding[3] == queue and binding[2] == routing_key:
                self._segment.remove_record(table, record)

    def get_table(self, exchange):
        """The bindings of an exchange, from whichever process made them."""
        kind = self.typeof(exchange)
        table = set()
        for record in self._segment.records(exchange_channel(exchange)):
            binding = _binding(record)
            if binding and binding[0] == exchange:
                _, _, routing_key, queue, _ = binding
                table.add(kind.prepare_bind(queue, exchange, routing_key, None))
        return list(table)

    def typeof(self, exchange, default="direct"):
        known = self.state.exchanges.get(exchange)
        kind = known["type"] if known else self._shared_type(exchange) or default
        return self.exchange_types[kind]

    def _shared_type(self, exchange):
        """The type recorded with an exchange's bindings, if it has any."""
        if not exchange:
            return None
        for record in self._segment.records(exchange_channel(exchange)):
            binding = _binding(record)
            if binding and binding[0] == exchange and binding[1] in self.exchange_types:
                return binding[1]
        return None

    def close(self):
        if not self._ours() and self._qos is not None:
            self._qos._delivered.clear()  # the parent settles its own
        super().close()


def _deadline(message):
    """The CLOCK_MONOTONIC deadline of a message's ``expiration`` (ms)."""
    expiration = message.get("properties", {}).get("expiration")
    if expiration is None:
        return NO_DEADLINE
    try:
        ms = float(expiration)
    except (TypeError, ValueError):
        return NO_DEADLINE
    return time.monotonic_ns() + max(0, int(ms * 1_000_000))


class Transport(virtual.Transport):
    """kombu's transport for ``dmb://<prefix>``.

    URL query and transport options: ``size`` (bytes of a segment that
    does not exist yet), ``mode`` (octal permission bits),
    ``recover_interval`` (seconds between looks for dead consumers);
    transport option ``prefix`` when the URL names none.
    """

    Channel = Channel
    can_parse_url = True
    default_port = None
    driver_type = "dmb"
    driver_name = "dmb"
    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )
    connection_errors = virtual.Transport.connection_errors + (SegmentError,)
    channel_errors = virtual.Transport.channel_errors + (SegmentFull,)

    def __init__(self, client, **kwargs):
        super().__init__(client, **kwargs)
        options = parse_options(client.hostname, client.transport_options)
        self.prefix = options["prefix"]
        self.size = options["size"]
        self.mode = options["mode"]
        self.recover_interval = options["recover_interval"]
        self.segment_name = seg.segment_name(self.prefix)
        self._pid = os.getpid()
        self._client = None
        self._owned_queues = set()
        self._owned_bindings = {}  # queue -> {(table, record)}
        self._marked = set()  # queue channels our slot is marked waiting on
        self._rotation = itertools.count()
        self._recovered_at = None
        self._hub = None
        self._recover_timer = None

    def driver_version(self):
        return __version__

    def as_uri(self, uri, include_password=False, mask="**"):
        return uri  # a dmb:// URL holds no password

    def client_segment(self):
        if self._client is None:
            self._client = SegmentClient(self.prefix, self.size, self.mode)
        return self._client

    def establish_connection(self):
        self.client_segment()
        return super().establish_connection()

    def _owner_of(self, queue):
        """The owner recorded with a binding: ours for an auto-delete queue."""
        if queue not in self._owned_queues:
            return ""
        return self.client_segment().slot().owner

    def _forget_owned(self, queue):
        self._owned_queues.discard(queue)
        self._owned_bindings.pop(queue, None)

    # Delivering.

    def _consumer_started(self):
        if self._recovered_at is None:
            self._recover_now()

    def _deliver_ready(self, limit, wait):
        """Deliver up to ``limit`` messages, one per consumed queue in turn.

        With ``wait``, each queue found empty is marked waiting in the
        same locked step, so a caller that got nothing may sleep on the
        FIFO without missing a message.  Returns how many were delivered.
        """
        pairs = [(c, q) for c in list(self.channels) for q in c._active_queues]
        if pairs:
            start = next(self._rotation) % len(pairs)
            pairs = pairs[start:] + pairs[:start]
        flags = lib.DMB_RECV_UNWAIT | (lib.DMB_RECV_WAIT if wait else 0)
        delivered, marked, busy = 0, set(), True
        while busy and delivered < limit:
            busy = False
            for channel, queue in pairs:
                name = queue_channel(queue)
                if name in marked or queue not in channel._deliver_to:
                    continue
                if not channel.qos.can_consume():
                    continue
                if channel._take_one(queue, flags):
                    delivered += 1
                    busy = True
                    if delivered >= limit:
                        break
                else:
                    marked.add(name)
        if not wait:
            return delivered
        if delivered:
            self._marked |= marked
        else:
            self._set_marked(marked)
        return delivered

    def _set_marked(self, marked):
        """Stop waiting on queues we no longer take from (cancelled, or
        their channel at its prefetch limit), so they do not wake us."""
        client = self.client_segment()
        for name in self._marked - marked:
            client.unwait(name)
        self._marked = marked

    def drain_events(self, connection, timeout=None):
        """Deliver one message, waiting up to ``timeout`` seconds for it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        slot = self.client_segment().slot()
        while True:
            self._recover_if_due()
            if self._deliver_ready(1, wait=True):
                return
            wait = self._until_recovery()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                wait = min(wait, left)
            slot.wait(wait)

    def register_with_event_loop(self, connection, loop):
        """Deliver from kombu's event loop (Celery's worker) on wake-ups."""
        slot = self.client_segment().slot()
        self._hub = loop
        loop.add_reader(slot.doorbell.fd, self._on_readable)
        loop.on_tick.add(self._on_tick)
        self._recover_timer = loop.call_repeatedly(
            self.recover_interval, self._recover_now
        )

    def _on_readable(self):
        self.client_segment().slot().doorbell.take_reasons()

    def _on_tick(self):
        # Runs before each poll of the loop, beside other tick callbacks in
        # no set order.  What it delivers may need another turn of the loop
        # (Celery's pool hands a task to a child in its own tick), and more
        # may be waiting after a batch: ring ourselves, so the poll returns
        # at once instead of sleeping until the next timer.
        if self._deliver_ready(_PUMP_BATCH, wait=True):
            self._ring_self()
        if self.client_segment().recover_due:
            self._recover_now()

    def _ring_self(self):
        try:
            os.write(self.client_segment().slot().doorbell.fd, _ALL_REASONS)
        except BlockingIOError:
            pass  # full: the loop is due to wake anyway

    def _unregister(self):
        hub, self._hub = self._hub, None
        if hub is None:
            return
        hub.on_tick.discard(self._on_tick)
        if self._recover_timer is not None:
            self._recover_timer.cancel()
            self._recover_timer = None
        slot = self._client and self._client._slot
        if slot is not None and slot.current:
            hub.remove_reader(slot.doorbell.fd)

    # Dead consumers.

    def _until_recovery(self):
        if self._recovered_at is None:
            return 0
        due = self._recovered_at + self.recover_interval
        return max(0.0, due - time.monotonic())

    def _recover_if_due(self):
        client = self.client_segment()
        if client.recover_due or self._until_recovery() <= 0:
            self._recover_now()

    def _recover_now(self):
        client = self.client_segment()
        client.recover_due = False
        self._recovered_at = time.monotonic()
        try:
            recover(client)
        except SegmentError:
            logger.exception("segment %s: recovering messages failed", client.name)

    def close_connection(self, connection):
        self._unregister()
        super().close_connection(connection)
        client = self._client
        if client is None or self._pid != os.getpid():
            return  # inherited across fork: the parent's to close
        for queue, bindings in list(self._owned_bindings.items()):
            for table, record in bindings:
                _drop_bindings(client, table, [(record, queue)])
        self._owned_bindings.clear()
        client.close()
        self._client = None


def parse_options(url, transport_options):
    """prefix, size, mode and recover_interval from a URL and options.

    The URL (``dmb://<prefix>?size=...&mode=640&recover_interval=2``) wins
    over transport options; a wrong value is a ConfigError naming it.
    """
    options = dict(transport_options or {})
    if url and "://" in url:
        parts = urllib.parse.urlsplit(url)
        prefix = parts.netloc or parts.path.strip("/")
        if prefix:
            options["prefix"] = urllib.parse.unquote(prefix)
        for key, value in urllib.parse.parse_qsl(parts.query):
            if key not in ("size", "mode", "recover_interval"):
                raise ConfigError(
                    f"broker URL {url!r}: unknown option {key!r}; dmb:// takes "
                    f"size, mode and recover_interval"
                )
            options[key] = value
    try:
        size = options.get("size")
        size = None if size in (None, "") else int(size)
        mode = options.get("mode", 0o600)
        if isinstance(mode, str):
            mode = int(mode, 0) if mode.startswith("0o") else int(mode, 8)
        interval = float(options.get("recover_interval", DEFAULT_RECOVER_INTERVAL))
    except ValueError as exc:
        raise ConfigError(f"dmb broker options: {exc}") from None
    if not interval > 0:
        raise ConfigError(
            f"dmb broker option 'recover_interval' must be a positive number of "
            f"seconds, not {options.get('recover_interval')!r}"
        )
    config = {"prefix": options.get("prefix", DEFAULT_PREFIX), "mode": mode}
    if size is not None:
        config["size"] = size
    checked = validate_config(config)
    return {
        "prefix": checked["prefix"],
        "size": size,
        "mode": checked["mode"],
        "recover_interval": interval,
    }


# ---------------------------------------------------------------------------
# For python -m dmb.inspect.


def queue_summary(segment):
    """The kombu queues of a segment, for ``python -m dmb.inspect``.

    ``segment`` is anything with a ``handle`` (``dmb.segment.Segment``,
    inspect's ``SegmentReader``) or the handle itself.  Takes no slot and
    changes nothing.  Returns one dict per queue, by name::

        {"queue": "celery", "ready": 3, "unacked": 1,
         "oldest_ready_age": 0.25,      # seconds, None if none is ready
         "consumers": [{"owner": "3.1a.1", "pid": 1234, "alive": True,
                        "unacked": 1, "oldest_age": 2.5}],
         "bindings": [{"exchange": "celery", "type": "direct",
                       "routing_key": "celery"}]}

    A queue named by a hash (too long, or with a ``!``) shows the hash
    unless a binding tells its name.
    """
    h = getattr(segment, "handle", segment)
    scratch = _Scratch()
    now = time.monotonic_ns()
    queues = {}
    names = {}

    def entry(key):
        return queues.setdefault(
            key,
            {
                "queue": key,
                "ready": 0,
                "unacked": 0,
                "oldest_ready_age": None,
                "consumers": [],
                "bindings": [],
            },
        )

    for name, info in scan(h, NAMESPACE, scratch):
        if name.startswith(QUEUE):
            found = entry(name[len(QUEUE) :])
            found["ready"] = info.depth
            if info.depth:
                found["oldest_ready_age"] = _age(now, info.oldest_ns)
        elif name.startswith(PENDING):
            _summarise_pending(h, name, info, now, entry, scratch)
        elif name.startswith(EXCHANGE):
            for record in peek_all(h, name.encode(), scratch):
                binding = _binding(record)
                if binding is None:
                    continue
                exchange, kind, routing_key, queue, _ = binding
                names[name_key(queue)] = queue
                entry(name_key(queue))["bindings"].append(
                    {"exchange": exchange, "type": kind, "routing_key": routing_key}
                )
    for key, found in queues.items():
        found["queue"] = names.get(key, key)
        found["bindings"].sort(key=lambda b: (b["exchange"], b["routing_key"]))
    return sorted(queues.values(), key=lambda q: q["queue"])


def _summarise_pending(h, name, info, now, entry, scratch):
    parsed = _parse_pending(name)
    if parsed is None:
        return
    slot, gen, key = parsed
    slot_info = scratch.slot_info
    pid, alive = None, False
    if 0 <= slot < lib.DMB_MAX_SLOTS:
        lib.dmb_slot_info(h, slot, slot_info)
        if slot_info.in_use and slot_info.gen == gen:
            pid = slot_info.pid
            alive = _running(pid, slot_info.start_time)
    found = entry(key)
    found["unacked"] += info.depth
    found["consumers"].append(
        {
            "owner": name[len(PENDING) :].partition(":")[0],
            "pid": pid,
            "alive": alive,
            "unacked": info.depth,
            "oldest_age": _age(now, info.oldest_ns) if info.depth else None,
        }
    )


def _age(now, then):
    return round(max(0, now - then) / _NS, 3)


TRANSPORT_ALIASES.setdefault(SCHEME, "dmb.kombu:Transport")
