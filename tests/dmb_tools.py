"""Test-side tools: look inside a segment, and drive peer processes.

A test reads the segment the way ``python -m dmb.inspect`` would, through
the C core's own read-out functions, so what it asserts is the state every
process shares and not one layer instance's private view of it.

``Peer`` runs ``tests/dmb_peer.py`` in a fresh interpreter: a real,
separate process with a layer of its own on the test's segment.  It speaks
JSON lines on stdout and takes JSON lines on stdin.
"""

import asyncio
import contextlib
import json
import os
import signal
import sys
import time

from dmb._ring_cffi import ffi, lib

from dmb.inspect import COUNTERS
from dmb.segment import Segment

PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dmb_peer.py")

#: The outcome counters of the accounting identity.
OUTCOMES = ("received", "expired", "dropped_full", "dropped_dead", "flushed")


@contextlib.contextmanager
def attached(name):
    """A private mapping of an existing segment, for reading its state."""
    segment = Segment(name, create=False)
    try:
        yield segment.handle
    finally:
        segment.close()


#: What stats() reads besides the counters.
USAGE = (
    "queued",
    "used_slots",
    "used_channels",
    "used_groups",
    "used_members",
    "used_nodes",
    "used_blocks",
    "size",
    "version",
)


def stats_of(handle):
    """The counters and usage of the segment behind a C handle, as a dict."""
    out = ffi.new("struct dmb_stats *")
    rc = lib.dmb_stats(handle, out)
    assert rc == 0, rc
    result = {field: getattr(out.counters, field) for field in COUNTERS}
    result.update({field: getattr(out, field) for field in USAGE})
    return result


def stats(name):
    """The segment's counters and usage, as a plain dict."""
    with attached(name) as handle:
        return stats_of(handle)


def identity_holds(counts):
    """sent == received + expired + dropped_full + dropped_dead + flushed + queued"""
    return counts["sent"] == sum(counts[k] for k in OUTCOMES) + counts["queued"]


def describe_identity(counts):
    terms = " + ".join(f"{k} {counts[k]}" for k in OUTCOMES + ("queued",))
    return f"sent {counts['sent']} vs {terms}"


def slots(name):
    """The process slots in use: a list of dicts (slot, pid, client)."""
    info = ffi.new("struct dmb_slot_info *")
    found = []
    with attached(name) as handle:
        for slot in range(lib.DMB_MAX_SLOTS):
            if lib.dmb_slot_info(handle, slot, info) != 0 or not info.in_use:
                continue
            found.append(
                {
                    "slot": slot,
                    "pid": info.pid,
                    "client": ffi.string(info.client).decode(),
                    "channels": info.channels,
                }
            )
    return found


def channels(name):
    """Every channel entry of the segment, by name: depth, waiters, owner."""
    info = ffi.new("struct dmb_channel_info *")
    found = {}
    with attached(name) as handle:
        index = 0
        while True:
            rc = lib.dmb_channel_at(handle, index, info)
            if rc < 0:
                break
            if rc == 1:
                mask = info.waiters[0] | (info.waiters[1] << 64)
                found[ffi.string(info.name).decode()] = {
                    "depth": info.depth,
                    "owner": info.owner,
                    "waiting_slots": {s for s in range(128) if mask >> s & 1},
                }
            index += 1
    return found


def slot_of(name, pid):
    """The slot held by process ``pid``, or None."""
    for slot in slots(name):
        if slot["pid"] == pid:
            return slot["slot"]
    return None


def wait_until(predicate, timeout, what, interval=0.01):
    """Poll ``predicate`` until it is true; fail naming ``what`` if never."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(predicate, timeout, what, interval=0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


def waiting_on(name, channel_names, pid):
    """True once process ``pid`` is marked waiting on every one of them
    (through any of its layers: a process may hold several slots)."""
    mine = {slot["slot"] for slot in slots(name) if slot["pid"] == pid}
    table = channels(name)
    return bool(mine) and all(
        c in table and mine & table[c]["waiting_slots"] for c in channel_names
    )


class Peer:
    """A separate process running one action of ``dmb_peer.py``."""

    def __init__(self, proc, action):
        self.proc = proc
        self.action = action
        self.pid = proc.pid
        self.lines = asyncio.Queue()
        self.stderr = bytearray()
        self._readers = [
            asyncio.ensure_future(self._read_stdout()),
            asyncio.ensure_future(self._read_stderr()),
        ]

    @classmethod
    async def start(cls, action, config, **spec):
        spec.update(action=action, config=config)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            PEER_SCRIPT,
            json.dumps(spec),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc, action)

    async def _read_stdout(self):
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                await self.lines.put(None)
                return
            await self.lines.put(json.loads(line))

    async def _read_stderr(self):
        while True:
            chunk = await self.proc.stderr.read(65536)
            if not chunk:
                return
            self.stderr += chunk

    def _failure(self, what):
        return AssertionError(
            f"peer {self.action} (pid {self.pid}) {what}; its stderr:\n"
            f"{self.stderr.decode(errors='replace')[-3000:]}"
        )

    async def next(self, timeout):
        """The next JSON line the peer printed."""
        try:
            line = await asyncio.wait_for(self.lines.get(), timeout)
        except TimeoutError:
            raise self._failure(f"said nothing for {timeout} s") from None
        if line is None:
            await self.lines.put(None)
            await asyncio.sleep(0.1)  # let stderr arrive
            raise self._failure(f"ended (exit {self.proc.returncode})")
        return line

    async def expect(self, key, timeout):
        """Skip lines until one has ``key``; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            line = await self.next(max(0.01, deadline - time.monotonic()))
            if key in line:
                return line[key]

    async def tell(self, **command):
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self.proc.stdin.drain()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)

    async def finish(self, timeout=20):
        """Wait for the peer to exit; fail if it did not exit cleanly."""
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise self._failure(f"did not exit within {timeout} s") from None
        await asyncio.gather(*self._readers)
        if code != 0:
            raise self._failure(f"exited with {code}")

    async def died(self, timeout=20):
        """Wait for a killed peer to be gone; return the lines not yet read."""
        await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(asyncio.gather(*self._readers), timeout)
        rest = []
        while not self.lines.empty():
            line = self.lines.get_nowait()
            if line is not None:
                rest.append(line)
        await self.lines.put(None)
        return rest

    async def reap(self):
        """Make sure the process is gone (used at teardown and after kill)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        if self.proc.stdin is not None:
            self.proc.stdin.close()


@contextlib.asynccontextmanager
async def peers():
    """Collect peers started in the block; every one is reaped at the end."""
    started = []

    async def start(action, config, **spec):
        peer = await Peer.start(action, config, **spec)
        started.append(peer)
        return peer

    try:
        yield start
    finally:
        for peer in started:
            await peer.reap()
