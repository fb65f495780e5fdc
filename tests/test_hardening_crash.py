"""Processes killed in the middle of an operation, and what the dead leave.

A process dies holding the segment lock (the C core's test crash points:
killed by SIGKILL on the spot, or stopped there and killed from here), or
at any moment of a busy loop of sends, receives and group sends.  What must
hold each time: a live process goes on within 100 ms of the death, the
segment stays consistent (the accounting identity holds and a repair finds
nothing to change), and no message arrives torn.

A dead process's slot, specific channels and memberships are reclaimed as
soon as any process notices (a new process attaching, a failed wake-up, a
group send), its queued messages counted ``dropped_dead``; a process that
reuses its pid is not taken for it.
"""

import asyncio
import contextlib
import glob
import os
import random
import signal
import subprocess
import threading
import time
import traceback

import pytest
from channels.exceptions import ChannelFull

from dmb import SegmentError, SharedMemoryChannelLayer
from dmb._ring_cffi import lib
from dmb.segment import process_start_time, segment_path

from conftest import TEST_SIZE
from hardening_support import (
    channels,
    format_counters,
    group_members,
    handle_of,
    identity_holds,
    is_whole,
    kill,
    message,
    repair_changes_nothing,
    slot_of_pid,
    slots,
    stats,
)

pytestmark = pytest.mark.timeout(60)

#: The longest a live process may stall after another dies.
STALL_LIMIT_NS = 100_000_000
#: How long live traffic must stand still to count as blocked.
BLOCKED_NS = 300_000_000

POINTS = {
    1: "send, record stored but not linked",
    2: "send, linked but not counted",
    3: "receive, copied out but not unlinked",
    4: "group_send, after its first member",
}
ACTIONS = {1: "killed", 2: "paused"}

CRASH_CHANNEL = "hard.k"
GROUP = "hard.room"
MEMBERS = ("hard.m1", "hard.m2")


class LiveTraffic(threading.Thread):
    """Round trips on a channel of its own, as fast as it can, noting when
    each one completed (CLOCK_MONOTONIC, the same clock in every process).

    cffi drops the GIL around C calls, so this thread blocks on the segment
    lock as another process would, while the test goes on.
    """

    def __init__(self, layer, channel="hard.live"):
        super().__init__(daemon=True)
        self.layer = layer
        self.channel = channel
        self.done = [time.monotonic_ns()]
        self.halt = threading.Event()
        self.errors = []

    def run(self):
        try:
            asyncio.run(self._loop())
        except BaseException as exc:  # reported by stop()
            self.errors.append("".join(traceback.format_exception(exc)))

    async def _loop(self):
        n = 0
        while not self.halt.is_set():
            await self.layer.send(self.channel, {"type": "live", "n": n})
            got = await self.layer.receive(self.channel)
            assert got == {"type": "live", "n": n}, got
            n += 1
            self.done.append(time.monotonic_ns())

    def wait_for(self, rounds, timeout=5.0):
        deadline = time.monotonic() + timeout
        while len(self.done) < rounds:
            assert time.monotonic() < deadline, "live traffic never got going"
            time.sleep(0.001)

    def first_after(self, t_ns, timeout=5.0):
        """The first completion after t_ns, waiting for it if need be."""
        deadline = time.monotonic() + timeout
        while self.done[-1] <= t_ns:
            assert time.monotonic() < deadline, "live traffic never resumed"
            time.sleep(0.0005)
        return next(t for t in self.done if t > t_ns)

    def longest_gap(self):
        done = self.done
        return max(b - a for a, b in zip(done, done[1:]))

    def stop(self):
        self.halt.set()
        self.join(10)
        assert not self.is_alive(), "live traffic is stuck"
        assert not self.errors, self.errors[0]


def fork_child(prefix, body):
    """Fork a process that joins the segment, tells us, waits for the word,
    then runs ``body(layer)``.  Returns (pid, write end of the word pipe).

    The child never returns into pytest: it leaves with os._exit, status 3
    if ``body`` returned (a crash point never reached) and 4 on an error.
    """
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 4
        try:
            os.close(ready_r)
            os.close(go_w)
            layer = SharedMemoryChannelLayer(prefix=prefix, size=TEST_SIZE)
            os.write(ready_w, b"r")
            os.read(go_r, 1)
            body(layer)
            status = 3
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(ready_w)
    os.close(go_r)
    assert os.read(ready_r, 1) == b"r", "the child did not join the segment"
    os.close(ready_r)
    return pid, go_w


def crash_at(point, action):
    """The body of a child that stops at ``point`` holding the lock."""

    def body(layer):
        lib.dmb_test_crash_at(point, action)
        if point in (1, 2):
            layer.send_sync(CRASH_CHANNEL, message(1000 + point, size=3000))
        elif point == 3:
            asyncio.run(layer.receive(CRASH_CHANNEL))
        else:
            layer.group_send_sync(GROUP, message(2000, size=3000))

    return body


def prepare(layer):
    """Something to receive on the crash channel, and a group of two."""
    for channel in MEMBERS:
        layer.group_add_sync(GROUP, channel)
    layer.send_sync(CRASH_CHANNEL, message(1, size=3000))


def wait_killed(pid):
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), f"child exited with {os.WEXITSTATUS(status)}"
    assert os.WTERMSIG(status) == signal.SIGKILL


def crash_trial(layer, prefix, point, action):
    """One death at a crash point; returns the stall it caused (ns)."""
    handle = handle_of(layer)
    if point == 3:
        layer.send_sync(CRASH_CHANNEL, message(3, size=3000))
    repairs = stats(handle)["repairs"]
    pid, go = fork_child(prefix, crash_at(point, action))
    live = LiveTraffic(layer)
    try:
        live.start()
        live.wait_for(20)
        os.write(go, b"g")
        if action == 1:
            wait_killed(pid)
            time.sleep(0.1)
            live.first_after(time.monotonic_ns())
            gap = live.longest_gap()
        else:
            wait_blocked(live)
            t_kill = time.monotonic_ns()
            kill(pid)
            gap = live.first_after(t_kill) - t_kill
            wait_killed(pid)
    finally:
        kill(pid)
        os.close(go)
        live.stop()
    assert stats(handle)["repairs"] == repairs + 1, "nobody repaired the segment"
    return gap


def wait_blocked(live, timeout=5.0):
    """Live traffic stands still: the child holds the lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic_ns() - live.done[-1] < BLOCKED_NS:
        assert time.monotonic() < deadline, "the paused child never held the lock"
        time.sleep(0.01)


def assert_consistent(handle):
    numbers = stats(handle)
    assert identity_holds(numbers), format_counters(numbers)
    before, after = repair_changes_nothing(handle)
    assert before == after


async def drain(layer, channel):
    """Everything queued on a channel (receive until it stays empty)."""
    got = []
    while True:
        try:
            got.append(await asyncio.wait_for(layer.receive(channel), 0.05))
        except asyncio.TimeoutError:
            return got


def assert_nothing_torn(layer, names):
    for channel in names:
        for received in asyncio.run(drain(layer, channel)):
            assert is_whole(received), f"torn message on {channel}"


@pytest.mark.parametrize("action", sorted(ACTIONS), ids=ACTIONS.get)
@pytest.mark.parametrize("point", sorted(POINTS), ids=lambda p: f"point{p}")
def test_lock_holder_death_stalls_nobody(make_layer, prefix, point, action):
    layer = make_layer()
    prepare(layer)
    gap = crash_trial(layer, prefix, point, action)
    if gap >= STALL_LIMIT_NS:  # once more, in case the machine was busy
        gap = crash_trial(layer, prefix, point, action)
    print(
        f"\n{POINTS[point]}, holder {ACTIONS[action]}: live traffic stalled "
        f"{gap / 1e6:.1f} ms"
    )
    assert gap < STALL_LIMIT_NS, f"stalled {gap / 1e6:.1f} ms"
    handle = handle_of(layer)
    assert_consistent(handle)
    assert_nothing_torn(layer, (CRASH_CHANNEL,) + MEMBERS)
    assert_consistent(handle)


def test_lock_held_for_ever_fails_clearly(make_layer, prefix):
    """A holder that is alive but never lets go (stopped, or a lock word
    damaged into "held"): an operation fails with a clear error after the
    patience limit instead of waiting for ever, and once the holder dies
    everything works again."""
    layer = make_layer()
    prepare(layer)
    pid, go = fork_child(prefix, crash_at(1, 2))
    lib.dmb_test_lock_patience(200)
    try:
        os.write(go, b"g")
        deadline = time.monotonic() + 5
        while True:  # until the child has the lock
            started = time.monotonic()
            try:
                layer.send_sync("hard.other", message(5))
            except SegmentError as exc:
                error = exc
                break
            assert time.monotonic() < deadline, "the child never took the lock"
            time.sleep(0.01)
        waited = time.monotonic() - started
    finally:
        lib.dmb_test_lock_patience(10_000)
        kill(pid)
        os.close(go)
    wait_killed(pid)
    assert "has been held for over" in str(error) and layer.segment_name in str(error)
    assert 0.15 < waited < 3, waited
    layer.send_sync("hard.other", message(6))
    assert is_whole(asyncio.run(layer.receive("hard.other")))
    assert_consistent(handle_of(layer))


def busy_loop(seed):
    """The body of a child that sends, receives and group-sends until it
    is killed, every message checkable."""

    def body(layer):
        asyncio.run(churn(layer, random.Random(seed), seed * 100000))

    return body


async def churn(layer, rng, seq):
    while True:
        seq += 1
        choice = rng.random()
        size = rng.randrange(2000)
        if choice < 0.4:
            with contextlib.suppress(ChannelFull):
                await layer.send(CRASH_CHANNEL, message(seq, size=size))
        elif choice < 0.7:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(layer.receive(CRASH_CHANNEL), 0.002)
        else:
            await layer.group_send(GROUP, message(seq, size=size))


def test_death_at_any_moment_stalls_nobody(make_layer, prefix):
    """Children killed from outside at random moments of a busy loop (with
    or without the lock): live traffic never stalls past the limit."""
    layer = make_layer(capacity=50)
    prepare(layer)
    handle = handle_of(layer)
    rng = random.Random(7)
    gaps = []
    for trial in range(12):
        pid, go = fork_child(prefix, busy_loop(trial + 1))
        live = LiveTraffic(layer)
        try:
            live.start()
            live.wait_for(10)
            os.write(go, b"g")
            time.sleep(rng.uniform(0.005, 0.04))
            kill(pid)
            wait_killed(pid)
            live.first_after(time.monotonic_ns() + 20_000_000)
        finally:
            kill(pid)
            os.close(go)
            live.stop()
        gaps.append(live.longest_gap())
    gaps.sort()
    print(
        f"\nlongest stall per trial (ms): "
        f"{', '.join(f'{g / 1e6:.1f}' for g in gaps)}"
    )
    # Two trials may lose to machine noise; the rest must be within the limit.
    assert gaps[-3] < STALL_LIMIT_NS, gaps
    # The dead are noticed by the next process that attaches.
    make_layer(capacity=50)
    assert_consistent(handle)
    assert_nothing_torn(layer, (CRASH_CHANNEL,) + MEMBERS)
    assert_consistent(handle)
    numbers = stats(handle)
    print(format_counters(numbers))


# What a dead process leaves behind.


def hold_channels(report_w):
    """A child with a specific channel holding 3 messages and in a group,
    2 messages on a normal channel, and a receive waiting on a second
    specific channel (which is also in a group)."""

    def body(layer):
        async def run():
            held = await layer.new_channel()
            waiting = await layer.new_channel()
            await layer.group_add("hard.room", held)
            await layer.group_add("hard.waiting", waiting)
            for seq in range(3):
                await layer.send(held, message(seq))
            for seq in range(2):
                await layer.send("hard.normal", message(10 + seq))
            os.write(report_w, f"{held} {waiting}\n".encode())
            await layer.receive(waiting)

        asyncio.run(run())

    return body


def wait_until(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.mark.parametrize("notice", ["attach", "wakeup", "group_send"])
def test_dead_process_leftovers_are_reclaimed(make_layer, prefix, notice):
    layer = make_layer()
    handle = handle_of(layer)
    report_r, report_w = os.pipe()
    pid, go = fork_child(prefix, hold_channels(report_w))
    os.close(report_w)
    try:
        os.write(go, b"g")
        with os.fdopen(report_r) as report:
            held, waiting = report.readline().split()
        wait_until(
            lambda: waiting in channels(handle)
            and any(channels(handle)[waiting].waiters),
            what="the child to wait",
        )
    finally:
        kill(pid)
        os.close(go)
    wait_killed(pid)
    fifos = f"{segment_path(layer.segment_name)}.*.wake"
    before = stats(handle)
    # Dead, but nobody has noticed yet.
    assert slot_of_pid(handle, pid), "the child's slot went before anyone noticed"
    assert held in channels(handle) and held in group_members(handle, "hard.room")
    fifo_count = len(glob.glob(fifos))

    if notice == "attach":
        make_layer()
        lost = 3
    elif notice == "wakeup":
        layer.send_sync(waiting, message(99))
        lost = 4
    else:
        layer.group_send_sync("hard.waiting", message(99))
        lost = 4

    after = stats(handle)
    assert slot_of_pid(handle, pid) == []
    assert held not in channels(handle) and waiting not in channels(handle)
    assert group_members(handle, "hard.room") == set()
    assert group_members(handle, "hard.waiting") == set()
    assert after["dropped_dead"] - before["dropped_dead"] == lost
    assert len(glob.glob(fifos)) == fifo_count - 1 + (notice == "attach")
    # Normal channels keep their messages for the next reader.
    got = asyncio.run(drain(layer, "hard.normal"))
    assert [m["seq"] for m in got] == [10, 11] and all(map(is_whole, got))
    assert_consistent(handle)


def test_reused_pid_is_not_taken_for_the_dead_process(make_layer):
    """A slot left by a dead process whose pid now belongs to a live one
    (same pid, later start time) is reclaimed; the live one's is not."""
    layer = make_layer()
    handle = handle_of(layer)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        started = process_start_time(sleeper.pid)
        now = time.monotonic_ns()
        dead = lib.dmb_slot_acquire(
            handle, sleeper.pid, started - 7, 11, b"deadone", 7, now
        )
        alive = lib.dmb_slot_acquire(
            handle, sleeper.pid, started, 13, b"liveone", 7, now
        )
        assert dead >= 0 and alive >= 0
        layer.send_sync("x.deadone!1", message(1))
        layer.send_sync("x.liveone!1", message(2))
        before = stats(handle)

        make_layer()  # attaching sweeps the process table

        assert dead not in slots(handle)
        assert slots(handle)[alive][:2] == (sleeper.pid, started)
        assert "x.deadone!1" not in channels(handle)
        assert channels(handle)["x.liveone!1"].depth == 1
        assert stats(handle)["dropped_dead"] == before["dropped_dead"] + 1
        # A late reclaim naming the dead process's start time leaves the
        # live holder of the pid alone.
        assert lib.dmb_slot_reclaim(handle, alive, sleeper.pid, started - 7) == 0
        assert alive in slots(handle)
        assert_consistent(handle)
    finally:
        sleeper.kill()
        sleeper.wait()
