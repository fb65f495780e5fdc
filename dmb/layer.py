"""SharedMemoryChannelLayer: the Channels layer API over a dmb segment.

Every process that builds the layer takes a slot in the segment named by
its ``prefix`` and exchanges messages with the others through it.  The
public methods are coroutines, as Channels requires, but none of them
awaits anything except a receive with nothing to take: each call is one
short C operation under the segment lock.  So every method works from any
event loop and any thread, and the ``*_sync`` twins serve sync code (views,
Celery tasks) without an event loop at all.
"""

import asyncio
import atexit
import logging
import numbers
import os
import re
import secrets
import threading
import time
import weakref

import msgpack
from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer

from . import segment as seg
from ._ring_cffi import ffi, lib
from .errors import (
    ConfigError,
    ForeignChannel,
    InvalidMessage,
    MessageTooLarge,
    SegmentCorrupt,
    SegmentError,
    SegmentFull,
)
from .wakeup import ALL, Doorbell, Ringer

logger = logging.getLogger(__name__)

DEFAULT_SIZE = 32 * 1024 * 1024
DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024
#: channels_redis options that mean nothing on one host: accepted, ignored,
#: and reported by the dmb.W001 system check.
IGNORED_OPTIONS = ("hosts", "symmetric_encryption_keys")
#: What a prefix may hold (use fullmatch: "$" would let a final newline in).
PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]+")
#: The BACKEND strings that name this layer in CHANNEL_LAYERS.
BACKENDS = ("dmb.SharedMemoryChannelLayer", "dmb.layer.SharedMemoryChannelLayer")
#: The key channels_redis writes into messages to route them; refused here.
RESERVED_KEY = "__asgi_channel__"

_NS = 1_000_000_000
_SWEEP_INTERVAL_NS = 2 * _NS
_FIRST_BUFFER = 64 * 1024
_EMPTY = object()

#: Every live layer of this process, for fork and exit handling.
_layers = weakref.WeakSet()


class SharedMemoryChannelLayer(BaseChannelLayer):
    """A Channels layer for the processes of one host, over shared memory.

    Options (the CONFIG dict) are those of channels_redis, with the same
    defaults, plus ``size``, ``max_message_size`` and ``mode``; see
    docs/configuration.md.
    """

    extensions = ["groups", "flush"]

    def __init__(self, **config):
        options = validate_config(config)
        self.ignored_options = options.pop("ignored")
        super().__init__(expiry=options["expiry"], capacity=options["capacity"])
        self.group_expiry = options["group_expiry"]
        self.channel_capacity = self.compile_capacities(options["channel_capacity"])
        self.prefix = options["prefix"]
        self.size = options["size"]
        self.max_message_size = options["max_message_size"]
        self._max_message_size_option = config.get("max_message_size")
        self.mode = options["mode"]
        self.segment_name = seg.segment_name(
            self.prefix, shared=bool(self.mode & 0o077)
        )

        self._expiry_ns = int(self.expiry * _NS)
        self._group_expiry_ns = int(self.group_expiry * _NS)
        self._capacities = {}
        # Channel names that passed validation, in two generations: the
        # newer fills to _NAME_GENERATION names, then becomes the older and
        # the older is dropped.  A working set of that many names always
        # stays checked, and a larger one keeps much of itself.
        self._valid_names = set()
        self._valid_names_older = set()
        self._owned = {}  # specific channel -> the client prefix it matched
        self._segment = None
        self._slot = None
        self._local = threading.local()
        self._wait_lock = threading.Lock()
        self._attach_lock = threading.RLock()
        self._attach()
        _layers.add(self)

    # Attaching: a segment mapping, then a slot with its FIFO.

    def _attach(self):
        with self._attach_lock:
            if self._slot is not None:
                return
            if self._segment is None or self._segment.closed:
                self._segment = seg.Segment(self.segment_name, self.size, self.mode)
                self._fit_to_segment()
            self._h = self._segment.handle
            self._take_slot()

    def _fit_to_segment(self):
        """Take the message size limit from the segment actually attached.

        Another process may have made the segment with another size, and
        its store, not CONFIG 'size', bounds what one message can be: a
        limit worked out from CONFIG alone would let send accept messages
        the store can never hold, which then fail as if the segment were
        merely full.
        """
        actual = self._segment.size
        if actual == self.size:
            return
        try:
            self.max_message_size = _check_max_message_size(
                self._max_message_size_option, actual
            )
        except ConfigError:
            self._segment.close()
            raise ConfigError(
                f"CONFIG 'max_message_size' ({self._max_message_size_option}) "
                f"does not fit segment {self.segment_name!r}, which exists "
                f"with {actual} bytes, not CONFIG size {self.size}; lower it, "
                f"or remove the segment (python -m dmb.inspect --unlink "
                f"--prefix {self.prefix}) so it is made anew"
            ) from None

    def _take_slot(self):
        self._pid = os.getpid()
        self._client = secrets.token_hex(8)
        self._token = secrets.randbits(62) | 1
        self._doorbell = Doorbell(
            seg.wake_path(self.segment_name, self._token), self.mode
        )
        self._ringer = Ringer(lambda token: seg.wake_path(self.segment_name, token))
        self._waiting = {}  # channel name -> list of _Ticket
        self._waiting_index = {}  # channel index in the segment -> name
        self._index_of = {}  # name -> channel index
        self._last_sweep = 0
        try:
            slot, self._gen = seg.acquire_slot(
                self._h,
                self.segment_name,
                self._token,
                self._client.encode(),
                lambda: self._sweep(force=True),
            )
        except BaseException:
            self._doorbell.close()
            raise
        if slot < 0:
            self._doorbell.close()
            raise self._error(slot, "attach")
        self._slot = slot
        self._sweep(force=True)

    def _release_slot(self):
        """Give our slot back; the segment reclaims what it held."""
        with self._attach_lock:
            if self._slot is None:
                return
            slot, self._slot = self._slot, None
            if self._pid == os.getpid():
                lib.dmb_slot_release(self._h, slot, self._gen)
                self._retire_doorbell()
            else:
                self._doorbell.close(unlink=False)
            self._ringer.close()

    def _forget_after_fork(self):
        """In a forked child: the slot, FIFO and waiters are the parent's.

        The mapping stays valid; the next operation takes a slot of our own.
        """
        self._slot = None
        self._attach_lock = threading.RLock()
        self._wait_lock = threading.Lock()
        self._local = threading.local()
        if getattr(self, "_doorbell", None) is not None:
            self._doorbell.close(unlink=False)
        if getattr(self, "_ringer", None) is not None:
            self._ringer.close()

    # Channel layer API.

    def require_valid_channel_name(self, name, receive=False):
        """Channels' rules, and one of the segment's: a name is stored in
        fewer than 100 bytes.  Channels counts characters, and the part of
        a name after its '!' may hold non-ASCII letters of 2 to 4 bytes."""
        # The rules look at the name alone, so a name that passed once
        # passes again: a busy consumer's channel is checked only once.
        known = type(name) is str and not receive
        if known and (name in self._valid_names or name in self._valid_names_older):
            return True
        super().require_valid_channel_name(name, receive)
        size = len(name.encode())
        if size >= lib.DMB_NAME_MAX:
            raise TypeError(
                f"channel name {name!r} is {size} bytes in UTF-8; dmb stores "
                f"names of at most {lib.DMB_NAME_MAX - 1} bytes (non-ASCII "
                f"characters take 2 to 4 bytes each)"
            )
        if known:
            if len(self._valid_names) >= _NAME_GENERATION:
                self._valid_names_older = self._valid_names
                self._valid_names = set()
            self._valid_names.add(name)
        return True

    async def send(self, channel, message):
        """Send a message onto a (normal or process-specific) channel."""
        self.send_sync(channel, message)

    def send_sync(self, channel, message):
        """``send`` for sync code: no event loop needed."""
        self.require_valid_channel_name(channel)
        data = self._pack(message)
        if self._slot is None:
            self._attach()
        name = channel.encode()
        wake = self._scratch().wake

        def operation(now):
            return lib.dmb_send(
                self._h,
                self._slot,
                name,
                len(name),
                self._capacity_of(channel),
                data,
                len(data),
                now,
                now + self._expiry_ns,
                wake,
            )

        rc = self._retrying(operation)
        if rc == lib.DMB_ERR_FULL and "!" in channel and self._owner_died(channel):
            # Full because its process died busy (never waiting, so no
            # failed wake-up told us): now reclaimed, the send is dropped.
            rc = self._retrying(operation)
        if rc == lib.DMB_ERR_FULL:
            raise ChannelFull(channel)
        if rc < 0:
            raise self._error(rc, f"send to {channel!r}")
        if wake.mask[0] or wake.mask[1]:
            self._ring(wake)

    async def receive(self, channel):
        """Receive the first message that arrives on the channel.

        If several receivers (coroutines here or other processes) wait on one
        normal channel, each message goes to exactly one of them.
        """
        self.require_valid_channel_name(channel)
        if "!" in channel:
            self._check_owner(channel)
        if self._slot is None:
            self._attach()
        name = channel.encode()
        capacity = self._capacity_of(channel)
        message = self._take(name, capacity, 0)
        if message is not _EMPTY:
            return message
        return await self._wait_and_take(channel, name, capacity)

    async def _wait_and_take(self, channel, name, capacity):
        loop = asyncio.get_running_loop()
        ticket = _Ticket(loop)
        bell = self._watch(loop)
        try:
            while True:
                if bell is not self._doorbell or self._slot is None:
                    # close() ran while this receive waited: go on waiting
                    # in the slot the layer takes again, as any use does.
                    self._unwatch(loop, bell)
                    bell = None
                    self._attach()
                    bell = self._watch(loop)
                message = self._take_or_register(channel, name, capacity, ticket)
                if message is not _EMPTY:
                    return message
                # Cancellation here loses nothing: no message has been taken
                # for this receive, and the finally clause withdraws it.
                await ticket.future
                ticket.future = loop.create_future()
        finally:
            self._withdraw(channel, name, ticket)
            if bell is not None:
                self._unwatch(loop, bell)

    async def new_channel(self, prefix="specific"):
        """Return a new process-specific channel name, received only here."""
        if self._slot is None:
            self._attach()
        name = f"{prefix}.{self._client}!{secrets.token_hex(12)}"
        self.require_valid_channel_name(name)
        return name

    async def group_add(self, group, channel):
        """Add the channel to the group (or refresh its membership)."""
        self.group_add_sync(group, channel)

    def group_add_sync(self, group, channel):
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        if self._slot is None:
            self._attach()
        gname, cname = group.encode(), channel.encode()
        capacity = self._capacity_of(channel)
        rc = self._retrying(
            lambda now: lib.dmb_group_add(
                self._h,
                self._slot,
                gname,
                len(gname),
                cname,
                len(cname),
                capacity,
                now,
            )
        )
        if rc < 0:
            raise self._error(rc, f"group_add({group!r}, {channel!r})")

    async def group_discard(self, group, channel):
        """Remove the channel from the group; no error if it is not in it."""
        self.group_discard_sync(group, channel)

    def group_discard_sync(self, group, channel):
        self.require_valid_channel_name(channel)
        self.require_valid_group_name(group)
        if self._slot is None:
            self._attach()
        gname, cname = group.encode(), channel.encode()
        rc = self._retrying(
            lambda now: lib.dmb_group_discard(
                self._h, gname, len(gname), cname, len(cname)
            )
        )
        if rc < 0:
            raise self._error(rc, f"group_discard({group!r}, {channel!r})")

    async def group_send(self, group, message):
        """Send a message to every channel in the group.

        Members at capacity are skipped (and logged at INFO); the message is
        stored once and shared by all the members that take it.
        """
        self.group_send_sync(group, message)

    def group_send_sync(self, group, message):
        self.require_valid_group_name(group)
        data = self._pack(message)
        if self._slot is None:
            self._attach()
        gname = group.encode()
        scratch = self._scratch()
        now = time.monotonic_ns()
        rc = lib.dmb_group_send(
            self._h,
            gname,
            len(gname),
            data,
            len(data),
            now,
            now + self._expiry_ns,
            self._group_expiry_ns,
            scratch.full,
            scratch.nospace,
            scratch.wake,
        )
        if rc == lib.DMB_ERR_CORRUPT:
            # Not retried: some members may have had their copy already.
            logger.error("segment %s is damaged; repairing it", self.segment_name)
            lib.dmb_repair(self._h)
            raise SegmentCorrupt(
                f"group_send to {group!r}: segment {self.segment_name!r} was "
                f"damaged and has been repaired; the message may have reached "
                f"only some of the group's members, or none"
            )
        if rc < 0:
            raise self._error(rc, f"group_send to {group!r}")
        full, nospace = scratch.full[0], scratch.nospace[0]
        if full or nospace:
            self._log_skipped(group, rc, full, nospace)
        wake = scratch.wake
        if wake.mask[0] or wake.mask[1]:
            self._ring(wake)
        if now - self._last_sweep > _SWEEP_INTERVAL_NS:
            self._sweep()

    def _log_skipped(self, group, delivered, full, nospace):
        total = delivered + full + nospace
        if full:
            logger.info(
                "group_send to %r: %d of %d channels over capacity; "
                "the message was dropped for them",
                group,
                full,
                total,
            )
        if nospace:
            logger.warning(
                "group_send to %r: segment %s full, the message was dropped "
                "for %d of %d channels; raise CONFIG size",
                group,
                self.segment_name,
                nospace,
                total,
            )

    async def flush(self):
        """Drop every message and group of this prefix's segment.

        Processes stay attached, and a receive waiting now still gets the
        next message sent to its channel.
        """
        self.flush_sync()

    def flush_sync(self):
        if self._slot is None:
            self._attach()
        rc = lib.dmb_flush(self._h)
        if rc < 0:
            raise self._error(rc, "flush")

    async def close(self):
        """Leave the segment: give back this layer's slot.

        Messages queued on this layer's process-specific channels are
        dropped (they could never be received); normal channels keep theirs.
        The layer attaches again if it is used after this.
        """
        self.close_sync()

    def close_sync(self):
        self._release_slot()

    # Receiving.

    def _take(self, name, capacity, flags):
        """One non-blocking receive: a message, or _EMPTY."""
        data = self._take_raw(name, capacity, flags)
        if data is _EMPTY:
            return _EMPTY
        return self._unpack(data)

    def _take_raw(self, name, capacity, flags):
        """Pop into this thread's buffer; return a view of it, or _EMPTY.

        With DMB_RECV_WAIT and nothing to take, the channel's index is left
        in the scratch length, for _take_or_register.
        """
        scratch = self._scratch()
        if scratch.buf is None:
            scratch.grow(_FIRST_BUFFER)

        def operation(now):
            return lib.dmb_recv(
                self._h,
                self._slot,
                name,
                len(name),
                capacity,
                now,
                flags,
                scratch.buf,
                scratch.buf_len,
                scratch.len,
            )

        while True:
            # The common case straight, the codes _retrying mends through it.
            rc = operation(time.monotonic_ns())
            if rc < 0 and rc in _MENDABLE:
                rc = self._retrying(operation)
            if rc == 1:
                return ffi.buffer(scratch.buf, scratch.len[0])
            if rc == 0:
                return _EMPTY
            if rc == lib.DMB_ERR_TOOBIG:
                scratch.grow(scratch.len[0])
                continue
            raise self._error(rc, f"receive from {name.decode()!r}")

    def _take_or_register(self, channel, name, capacity, ticket):
        """Take a message, or mark this receive as waiting for one."""
        with self._wait_lock:
            waiters = self._waiting.setdefault(channel, [])
            if ticket not in waiters:
                waiters.append(ticket)
            flags = lib.DMB_RECV_WAIT
            if len(waiters) == 1:
                flags |= lib.DMB_RECV_UNWAIT  # we are the last to wait here
            data = self._take_raw(name, capacity, flags)
            if data is _EMPTY:
                index = self._scratch().len[0]
                self._waiting_index[index] = channel
                self._index_of[channel] = index
                return _EMPTY
            waiters.remove(ticket)
            if not waiters:
                self._forget_waiting(channel)
        return self._unpack(data)

    def _withdraw(self, channel, name, ticket):
        """A receive is done (or cancelled): stop waiting on its behalf."""
        with self._wait_lock:
            waiters = self._waiting.get(channel)
            if not waiters or ticket not in waiters:
                return
            waiters.remove(ticket)
            if waiters:
                return
            self._forget_waiting(channel)
            if self._slot is not None:
                lib.dmb_unwait(self._h, self._slot, name, len(name))

    def _forget_waiting(self, channel):
        del self._waiting[channel]
        index = self._index_of.pop(channel, None)
        if self._waiting_index.get(index) == channel:
            del self._waiting_index[index]

    def _unpack(self, data):
        # Every sender checked its message decodes to a dict (_pack), so
        # anything else was damaged in the segment.  It has been taken
        # already: say so rather than hand a consumer garbage.
        try:
            message = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (ValueError, TypeError, OverflowError, msgpack.UnpackException):
            message = None
        if not isinstance(message, dict):
            raise SegmentCorrupt(
                f"segment {self.segment_name!r} held a damaged message "
                f"({len(data)} bytes that do not decode to a dict); it was "
                f"dropped"
            )
        return message

    def _check_owner(self, channel):
        if self._owned.get(channel) is self._client and self._slot is not None:
            return  # checked already, for the slot we hold now
        head = channel[: channel.index("!")]
        if self._slot is None:
            self._attach()
        if head != self._client and not head.endswith("." + self._client):
            raise ForeignChannel(
                f"cannot receive on {channel!r}: it is a process-specific "
                f"channel made by another process (or another layer instance); "
                f"only the layer whose new_channel() made it can receive on it"
            )
        if len(self._owned) >= 10000:
            self._owned.clear()
        self._owned[channel] = self._client

    # Waking.

    def _watch(self, loop):
        """Watch this slot's FIFO in ``loop``; return the doorbell watched."""
        with self._wait_lock:
            bell = self._doorbell
            # A count of 0 means the reader is still there (_unwatch left
            # it in): reuse it.
            registered = loop in bell.loops
            if not registered:
                for old in [lp for lp, n in bell.loops.items() if not n]:
                    if old.is_closed():
                        del bell.loops[old]  # its selector went with it
            bell.loops[loop] = bell.loops.get(loop, 0) + 1
        if not registered:
            loop.add_reader(bell.fd, self._on_doorbell, bell)
        return bell

    def _unwatch(self, loop, bell):
        with self._wait_lock:
            count = bell.loops.get(loop, 0) - 1
            if count > 0:
                bell.loops[loop] = count
                return
            retired = bell is not self._doorbell or self._slot is None
            if not retired and asyncio._get_running_loop() is loop:
                # Leave the reader in (count 0): a consumer's next receive,
                # which usually follows at once, reuses it, which saves
                # taking the FIFO out of epoll and putting it back each
                # time.  _on_doorbell takes it out if it rings unwatched.
                bell.loops[loop] = 0
                return
            bell.loops.pop(loop, None)
            last = retired and not bell.loops
        if bell.fd is not None and not loop.is_closed():
            loop.remove_reader(bell.fd)
        if last:
            bell.close(unlink=False)  # _retire_doorbell left it to us

    def _drop_reader(self, loop, bell):
        """Take out a reader _unwatch left in, if nothing watches it again."""
        with self._wait_lock:
            if bell.loops.get(loop) != 0:
                return  # a receive watches again, or it went already
            del bell.loops[loop]
            retired = bell is not self._doorbell or self._slot is None
            last = retired and not bell.loops
        if bell.fd is not None and not loop.is_closed():
            loop.remove_reader(bell.fd)
        if last:
            bell.close(unlink=False)

    def _retire_doorbell(self):
        """Close our FIFO as the slot is given back.

        While receives still watch it, only its path goes: its descriptor
        stays open until the last of them stops watching, so no event loop
        is left watching a closed (and perhaps reused) descriptor.  Those
        receives are woken to wait on in the slot the layer takes next.
        """
        bell = self._doorbell
        with self._wait_lock:
            for loop in [lp for lp, n in bell.loops.items() if not n]:
                if loop.is_closed():
                    del bell.loops[loop]  # its selector went with it
            idle = [lp for lp, n in bell.loops.items() if not n]
            watched = bool(bell.loops)
            tickets = [t for ts in self._waiting.values() for t in ts]
        for loop in idle:  # readers _unwatch left in: out, each in its loop
            if loop is asyncio._get_running_loop():
                self._drop_reader(loop, bell)
            else:
                try:
                    loop.call_soon_threadsafe(self._drop_reader, loop, bell)
                except RuntimeError:
                    pass  # closed meanwhile: its selector went with it
        if not watched:
            bell.close()
            return
        try:
            os.unlink(bell.path)
        except FileNotFoundError:
            pass
        self._wake_tickets(tickets)

    def _on_doorbell(self, bell):
        if bell.fd is not None:
            self._wake_local(bell.take_reasons())
            loop = asyncio._get_running_loop()
            if bell.loops.get(loop) == 0:
                self._drop_reader(loop, bell)  # nobody waits here any more

    def _wake_local(self, reasons):
        """Wake this process's receives waiting on the channels rung."""
        with self._wait_lock:
            if ALL in reasons:
                tickets = [t for ts in self._waiting.values() for t in ts]
            else:
                tickets = []
                for index in reasons:
                    channel = self._waiting_index.get(index)
                    if channel is not None:
                        tickets.extend(self._waiting.get(channel, ()))
        self._wake_tickets(tickets)

    def _wake_tickets(self, tickets):
        running = asyncio._get_running_loop()
        for ticket in tickets:
            if ticket.loop is running:
                ticket.wake()
            elif not ticket.loop.is_closed():
                ticket.loop.call_soon_threadsafe(ticket.wake)

    def _ring(self, wake):
        """Write to the FIFO of every slot in the wake mask."""
        mask = wake.mask[0] | (wake.mask[1] << 64)
        reason = wake.channel
        info = self._scratch().slot_info
        while mask:
            low = mask & -mask
            mask ^= low
            slot = low.bit_length() - 1
            if slot == self._slot:
                self._wake_local((reason,))
                continue
            lib.dmb_slot_info(self._h, slot, info)
            if not info.in_use:
                continue
            if not self._ringer.ring(info.token, reason):
                self._reclaim_if_dead(slot, info.pid, info.start_time, info.token)

    # Dead processes.

    def _sweep(self, force=False):
        """Reclaim the slots of processes that died without leaving."""
        now = time.monotonic_ns()
        if not force and now - self._last_sweep < _SWEEP_INTERVAL_NS:
            return
        self._last_sweep = now
        info = ffi.new("struct dmb_slot_info *")
        for slot in range(lib.DMB_MAX_SLOTS):
            lib.dmb_slot_info(self._h, slot, info)
            if not info.in_use or info.pid == self._pid:
                continue
            self._reclaim_if_dead(slot, info.pid, info.start_time, info.token)

    def _owner_died(self, channel):
        """Is the process owning this specific channel gone?  If so, reclaim
        its slot (which drops what its channels held) and say True."""
        head = channel[: channel.index("!")]
        info = self._scratch().slot_info
        for slot in range(lib.DMB_MAX_SLOTS):
            lib.dmb_slot_info(self._h, slot, info)
            if not info.in_use or info.pid == self._pid:
                continue
            client = ffi.string(info.client).decode()
            if head == client or head.endswith("." + client):
                return self._reclaim_if_dead(
                    slot, info.pid, info.start_time, info.token
                )
        return False

    def _reclaim_if_dead(self, slot, pid, start_time, token):
        if pid == self._pid or seg.process_alive(pid, start_time):
            return False
        if lib.dmb_slot_reclaim(self._h, slot, pid, start_time) != 1:
            return False
        self._ringer.forget(token)
        try:
            os.unlink(seg.wake_path(self.segment_name, token))
        except FileNotFoundError:
            pass
        logger.info(
            "segment %s: reclaimed slot %d of process %d, which died without "
            "leaving; its queued messages were dropped",
            self.segment_name,
            slot,
            pid,
        )
        return True

    # Helpers.

    def _scratch(self):
        """This thread's receive buffer and out-parameters."""
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = _Scratch()
        return scratch

    def _capacity_of(self, channel):
        if not self.channel_capacity:
            return self.capacity
        capacity = self._capacities.get(channel)
        if capacity is None:
            capacity = self.get_capacity(channel)
            if len(self._capacities) > 10000:
                self._capacities.clear()
            self._capacities[channel] = capacity
        return capacity

    def _retrying(self, operation):
        """Run a C operation; on a full store or damage, mend and retry once.

        ``operation(now)`` must change nothing when it fails.
        """
        rc = operation(time.monotonic_ns())
        if rc == lib.DMB_ERR_NOSPACE or rc == lib.DMB_ERR_CHANNELS:
            now = time.monotonic_ns()
            lib.dmb_expire(self._h, now, self._group_expiry_ns)
            self._sweep(force=True)
            rc = operation(now)
        elif rc == lib.DMB_ERR_CORRUPT:
            logger.error("segment %s is damaged; repairing it", self.segment_name)
            lib.dmb_repair(self._h)
            rc = operation(time.monotonic_ns())
        return rc

    def _pack(self, message):
        if not isinstance(message, dict):
            raise InvalidMessage(
                f"message must be a dict, not {type(message).__name__}"
            )
        if RESERVED_KEY in message:
            raise InvalidMessage(
                f"message key {RESERVED_KEY!r} is reserved: channels_redis "
                f"routes by it, so a message carrying it would not survive a "
                f"switch of BACKEND"
            )
        try:
            data = self._scratch().pack(message)
            # Refuse at the sender what a receiver could not unpack: keys
            # that are not str (or bytes).
            msgpack.unpackb(data, raw=False, strict_map_key=True)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise TypeError(_describe_unsendable(message, exc)) from None
        if len(data) > self.max_message_size:
            raise MessageTooLarge(
                f"message of {len(data)} bytes (packed) is larger than "
                f"max_message_size ({self.max_message_size} bytes); send less, "
                f"or raise CONFIG max_message_size"
            )
        return data

    def _error(self, rc, what):
        """The one place a C error code becomes a Python exception."""
        name = self.segment_name
        if rc in _TABLE_NAMES:
            return SegmentFull(
                f"{what}: segment {name!r} is full ({self._usage(rc)}); raise "
                f"CONFIG size (then remove the segment so it is made anew), or "
                f"drain what is queued (python -m dmb.inspect --prefix "
                f"{self.prefix})"
            )
        if rc == lib.DMB_ERR_OWNER:
            return ForeignChannel(
                f"{what}: that process-specific channel belongs to another "
                f"process"
            )
        if rc == lib.DMB_ERR_CORRUPT:
            return SegmentCorrupt(
                f"{what}: segment {name!r} is damaged and repair did not mend "
                f"it; stop its processes and remove it (python -m dmb.inspect "
                f"--unlink --force --prefix {self.prefix})"
            )
        if rc == lib.DMB_ERR_LOCK:
            return SegmentError(f"{what}: the lock of segment {name!r} is unusable")
        if rc == lib.DMB_ERR_STALLED:
            return SegmentError(
                f"{what}: the lock of segment {name!r} has been held for over "
                f"10 s, much longer than any operation takes: a process holding "
                f"it is stopped (SIGSTOP, a debugger), or the segment is "
                f"damaged; see its processes with python -m dmb.inspect "
                f"--prefix {self.prefix}"
            )
        return SegmentError(f"{what}: segment {name!r} refused it (code {rc})")

    def _usage(self, rc):
        stats = ffi.new("struct dmb_stats *")
        lib.dmb_stats(self._h, stats)
        geometry = stats.geometry
        table = _TABLE_NAMES[rc]
        if rc == lib.DMB_ERR_NOSPACE:
            used = stats.used_blocks * lib.DMB_BLOCK_SIZE
            return (
                f"{stats.size} bytes, {used} of them holding {stats.queued} "
                f"queued messages; {stats.used_nodes} of {geometry.nodes} "
                f"queue entries in use"
            )
        limit = {
            "channel": geometry.channels,
            "group": geometry.groups,
            "membership": geometry.members,
        }[table]
        return f"all {limit} {table} entries are in use, of {stats.size} bytes"

    def __repr__(self):
        return f"<SharedMemoryChannelLayer segment={self.segment_name!r}>"


#: Validated channel names kept per generation (two generations are kept).
_NAME_GENERATION = 65536

#: What _retrying mends (expire and sweep, or repair) before it retries.
_MENDABLE = (lib.DMB_ERR_NOSPACE, lib.DMB_ERR_CHANNELS, lib.DMB_ERR_CORRUPT)

_TABLE_NAMES = {
    lib.DMB_ERR_NOSPACE: "message store",
    lib.DMB_ERR_CHANNELS: "channel",
    lib.DMB_ERR_GROUPS: "group",
    lib.DMB_ERR_MEMBERS: "membership",
}


class _Ticket:
    """One waiting receive: its loop and the future it sleeps on."""

    __slots__ = ("loop", "future")

    def __init__(self, loop):
        self.loop = loop
        self.future = loop.create_future()

    def wake(self):
        if not self.future.done():
            self.future.set_result(None)


class _Scratch:
    """A thread's C out-parameters and receive buffer, reused per call."""

    def __init__(self):
        self.wake = ffi.new("struct dmb_wake *")
        self.full = ffi.new("uint32_t *")
        self.nospace = ffi.new("uint32_t *")
        self.len = ffi.new("uint32_t *")
        self.slot_info = ffi.new("struct dmb_slot_info *")
        # A Packer keeps state between calls, so each thread has its own.
        self.pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
        # The receive buffer comes with the first receive: a thread that
        # only sends (async_to_sync makes one per call) never pays for it.
        self.buf = None
        self.buf_len = 0

    def grow(self, size):
        self.buf_len = max(size, _FIRST_BUFFER)
        self.buf = ffi.new("char[]", self.buf_len)


# Validation of options: each names the option and says what it takes.

#: Every option and its default (channels_redis's, where it has the option).
DEFAULTS = {
    "expiry": 60,
    "group_expiry": 86400,
    "capacity": 100,
    "channel_capacity": None,
    "prefix": "asgi",
    "size": DEFAULT_SIZE,
    "max_message_size": None,
    "mode": 0o600,
}


def validate_config(config):
    """Check a CONFIG dict; return every option's value, defaults filled in.

    Raises ConfigError naming the first wrong option.  The channels_redis
    options that mean nothing here come back under "ignored".
    """
    unknown = sorted(set(config) - set(DEFAULTS) - set(IGNORED_OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown CONFIG option(s) {', '.join(map(repr, unknown))} for "
            f"dmb.SharedMemoryChannelLayer; it takes {', '.join(DEFAULTS)} "
            f"(and ignores {' and '.join(IGNORED_OPTIONS)})"
        )
    given = {**DEFAULTS, **config}
    size = _check_size(given["size"])
    return {
        "expiry": _seconds("expiry", given["expiry"]),
        "group_expiry": _seconds("group_expiry", given["group_expiry"]),
        "capacity": _positive(
            "capacity", given["capacity"], integer=True, maximum=MAX_CAPACITY
        ),
        "channel_capacity": _check_channel_capacity(given["channel_capacity"]),
        "prefix": _check_prefix(given["prefix"]),
        "size": size,
        "max_message_size": _check_max_message_size(
            given["max_message_size"], size
        ),
        "mode": _check_mode(given["mode"]),
        "ignored": {key: config[key] for key in IGNORED_OPTIONS if key in config},
    }


#: The largest values the C core's fields carry: capacities are 32-bit, and
#: a time limit in nanoseconds plus the clock must fit in 64 bits.
MAX_CAPACITY = 2**32 - 1
MAX_SECONDS = 2**32  # about 136 years


def _positive(option, value, integer=False, maximum=None):
    kind = numbers.Integral if integer else numbers.Real
    # "not value > 0" also refuses NaN, which compares false to everything.
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        wanted = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"CONFIG {option!r} must be {wanted}, not {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"CONFIG {option!r} must be at most {maximum}, not {value!r}")
    return value


#: The shortest expiry that makes sense: below it a message or membership
#: lapses before another process could take it (and below 1 ns, at once).
MIN_SECONDS = 0.001


def _seconds(option, value):
    _positive(option, value, maximum=MAX_SECONDS)
    if value < MIN_SECONDS:
        raise ConfigError(
            f"CONFIG {option!r} must be at least {MIN_SECONDS} seconds, not "
            f"{value!r}: anything shorter lapses before another process can "
            f"take it"
        )
    return value


def _check_channel_capacity(channel_capacity):
    if channel_capacity is None:
        return {}
    if not isinstance(channel_capacity, dict):
        raise ConfigError(
            f"CONFIG 'channel_capacity' must be a dict of name pattern -> "
            f"capacity, not {type(channel_capacity).__name__}"
        )
    for pattern, capacity in channel_capacity.items():
        if not isinstance(pattern, str) and not hasattr(pattern, "match"):
            raise ConfigError(
                f"CONFIG 'channel_capacity' key {pattern!r} must be a glob "
                f"string or a compiled regex"
            )
        _positive(
            f"channel_capacity[{pattern!r}]",
            capacity,
            integer=True,
            maximum=MAX_CAPACITY,
        )
    return channel_capacity


def _check_prefix(prefix):
    if not isinstance(prefix, str) or not PREFIX_RE.fullmatch(prefix):
        raise ConfigError(
            f"CONFIG 'prefix' must be a non-empty string of ASCII letters, "
            f"digits, '-', '_' or '.', not {prefix!r}"
        )
    return prefix


def _check_size(size):
    _positive("size", size, integer=True)
    if size < seg.MIN_SIZE or size > 1 << 40:
        raise ConfigError(
            f"CONFIG 'size' must be between {seg.MIN_SIZE} and {1 << 40} "
            f"bytes, not {size}"
        )
    return size


def _check_max_message_size(max_message_size, size):
    """None means the default: 4 MiB, or half the store if that is less."""
    geometry = ffi.new("struct dmb_geometry *")
    lib.dmb_geometry_for_size(size, geometry)
    store = geometry.blocks * (lib.DMB_BLOCK_SIZE - 16)
    if max_message_size is None:
        return min(DEFAULT_MAX_MESSAGE_SIZE, store // 2)
    _positive("max_message_size", max_message_size, integer=True)
    if max_message_size > store // 2:
        raise ConfigError(
            f"CONFIG 'max_message_size' ({max_message_size}) must be at most "
            f"half of what a segment of {size} bytes can store ({store // 2}); "
            f"lower it or raise 'size'"
        )
    return max_message_size


def _check_mode(mode):
    if isinstance(mode, bool) or not isinstance(mode, int) or mode & ~0o777:
        raise ConfigError(
            f"CONFIG 'mode' must be permission bits such as 0o600, not {mode!r}"
        )
    if mode & 0o600 != 0o600:
        raise ConfigError(
            f"CONFIG 'mode' {oct(mode)} must let the owner read and write "
            f"(include 0o600)"
        )
    return mode


def _describe_unsendable(message, exc):
    """Say which key of a message msgpack cannot carry, and why."""
    allowed = (
        "messages may hold str, bytes, int (64-bit), float, bool, None, and "
        "lists and dicts of those, with str keys"
    )
    try:
        path, problem = _find_unsendable(message, ())
    except RecursionError:
        return f"message cannot be serialised: it is nested too deeply; {allowed}"
    where = "".join(f"[{key!r}]" for key in path) or "the message"
    if problem is None:
        return f"message cannot be serialised: {exc}; {allowed}"
    return f"message value at {where} cannot be sent: {problem}; {allowed}"


def _find_unsendable(value, path):
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, bytes)):
                return path, f"key {key!r} is a {type(key).__name__}"
            found = _find_unsendable(item, path + (key,))
            if found[1] is not None:
                return found
        return path, None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _find_unsendable(item, path + (index,))
            if found[1] is not None:
                return found
        return path, None
    try:
        msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        return path, f"{type(value).__name__} {_short(value)}: {exc}"
    return path, None


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _after_fork_in_child():
    for layer in list(_layers):
        layer._forget_after_fork()


def _at_exit():
    for layer in list(_layers):
        try:
            layer._release_slot()
        except Exception:  # the interpreter is going: never block that
            logger.debug("release at exit failed", exc_info=True)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
