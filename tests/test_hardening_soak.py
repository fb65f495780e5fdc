"""Soak: eight processes at random operations while one dies every 200 ms.

Each worker joins the segment and does sends (to normal channels and to
other workers' specific channels, some of them dead), receives with short
timeouts (so receives are cancelled while waiting), group adds, discards
and sends, and now and then a flush.  Every 200 ms one worker is killed
with SIGKILL and a new one started; a quarter of the new ones also arm a
crash point, so some deaths happen with the segment lock held.

At the end the segment's own counters must satisfy the accounting
identity, a repair must find nothing to change, no message may have
arrived torn or twice on one channel, and no worker may have met an error
other than a full channel.

    DMB_SOAK_SECONDS=60 pytest -s tests/test_hardening_soak.py

runs the full soak (CI runs 20 s); ``-s`` shows the counters.
"""

import asyncio
import collections
import contextlib
import os
import random
import signal
import time
import traceback

import pytest
from channels.exceptions import ChannelFull

from dmb import SharedMemoryChannelLayer
from dmb._ring_cffi import lib

from conftest import TEST_SIZE
from hardening_support import (
    channels,
    format_counters,
    handle_of,
    identity_holds,
    is_whole,
    message,
    repair_changes_nothing,
    stats,
)

SECONDS = float(os.environ.get("DMB_SOAK_SECONDS", "20"))
WORKERS = 8
KILL_EVERY = 0.2
NORMAL = [f"soak.n{i}" for i in range(4)]
GROUPS = [f"soak.g{i}" for i in range(3)]
SLOW = "soak.slow"
CONFIG = {"capacity": 20, "expiry": 1, "group_expiry": 3}

pytestmark = pytest.mark.timeout(SECONDS + 90)


class Worker:
    """One worker process's loop (runs in the forked child)."""

    def __init__(self, layer, ident, workdir, rng):
        self.layer = layer
        self.ident = ident
        self.rng = rng
        self.seq = 0
        self.names_path = os.path.join(workdir, "names")
        self.log = os.open(os.path.join(workdir, "received"), os.O_WRONLY | os.O_APPEND)
        self.problems = os.path.join(workdir, "problems")
        self.others = []

    async def run(self):
        self.own = [await self.layer.new_channel() for _ in range(2)]
        with open(self.names_path, "a") as names:
            names.write("".join(f"{name}\n" for name in self.own))
        arm_at = None
        if self.rng.random() < 0.25:
            arm_at = time.monotonic() + self.rng.uniform(0, 0.5)
        for step in range(10**9):
            if arm_at is not None and time.monotonic() > arm_at:
                lib.dmb_test_crash_at(self.rng.randint(1, 4), 1)
                arm_at = None
            if step % 200 == 0:
                self.read_names()
            with contextlib.suppress(ChannelFull):
                await self.step()

    def read_names(self):
        with open(self.names_path) as names:
            self.others = names.read().split()

    def next_message(self):
        self.seq += 1
        text = message(self.seq, size=self.rng.randrange(1, 1500))
        text["src"] = self.ident
        return text

    async def step(self):
        rng, layer = self.rng, self.layer
        roll = rng.random()
        if roll < 0.30:
            await layer.send(rng.choice(NORMAL), self.next_message())
        elif roll < 0.40 and self.others:
            await layer.send(rng.choice(self.others), self.next_message())
        elif roll < 0.65:
            await self.receive(rng.choice(NORMAL + self.own))
        elif roll < 0.73:
            await layer.group_add(rng.choice(GROUPS), rng.choice(self.own + NORMAL))
        elif roll < 0.77:
            await layer.group_discard(rng.choice(GROUPS), rng.choice(self.own))
        elif roll < 0.89:
            await layer.group_send(rng.choice(GROUPS), self.next_message())
        elif roll < 0.91:
            await layer.send(SLOW, self.next_message())
        elif roll < 0.9103:
            await self.receive(SLOW)  # too seldom: much of SLOW expires
        elif roll < 0.91035:
            await layer.flush()
        else:
            await self.receive(rng.choice(self.own))

    async def receive(self, channel):
        try:
            got = await asyncio.wait_for(self.layer.receive(channel), 0.005)
        except asyncio.TimeoutError:
            return
        if not is_whole(got):
            self.problem(f"torn message on {channel}: {got!r:.200}")
        os.write(self.log, f"{channel} {got['src']} {got['seq']}\n".encode())

    def problem(self, text):
        with open(self.problems, "a") as out:
            out.write(f"worker {self.ident}: {text}\n")


def start_worker(prefix, ident, workdir, seed):
    pid = os.fork()
    if pid:
        return pid
    status = 4
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        layer = SharedMemoryChannelLayer(prefix=prefix, size=TEST_SIZE, **CONFIG)
        worker = Worker(layer, ident, workdir, random.Random(seed))
        asyncio.run(worker.run())
    except BaseException:
        with open(os.path.join(workdir, "problems"), "a") as out:
            out.write(f"worker {ident}:\n{traceback.format_exc()}\n")
    finally:
        os._exit(status)


def reap_all_dead(running):
    """Collect workers that died on their own (armed crash points)."""
    gone = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        gone.append((pid, status))
        for index, worker in enumerate(running):
            if worker == pid:
                running[index] = None
    return gone


def test_soak_keeps_accounting(make_layer, prefix, tmp_path):
    layer = make_layer(**CONFIG)
    handle = handle_of(layer)
    for name in ("names", "received", "problems"):
        (tmp_path / name).write_text("")
    rng = random.Random(20240611)
    ident = 0
    running = []
    for _ in range(WORKERS):
        running.append(start_worker(prefix, ident, str(tmp_path), rng.random()))
        ident += 1
    kills = self_kills = 0
    deadline = time.monotonic() + SECONDS
    try:
        while time.monotonic() < deadline:
            time.sleep(KILL_EVERY)
            victim = running[rng.randrange(WORKERS)]
            if victim is not None:
                os.kill(victim, signal.SIGKILL)
                kills += 1
            for pid, _ in reap_all_dead(running):
                self_kills += pid != victim
            for index, worker in enumerate(running):
                if worker is None:
                    running[index] = start_worker(
                        prefix, ident, str(tmp_path), rng.random()
                    )
                    ident += 1
    finally:
        for worker in running:
            if worker is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker, signal.SIGKILL)
        while reap_all_dead(running):
            time.sleep(0.01)
        time.sleep(0.05)
        reap_all_dead(running)

    problems = (tmp_path / "problems").read_text()
    assert not problems, problems
    # Some process notices the dead: a new one attaches and sweeps.
    make_layer(**CONFIG)
    numbers = stats(handle)
    print(
        f"\nsoak {SECONDS:g} s, {ident} workers started, {kills} killed from "
        f"outside, {numbers['repairs']} deaths with the lock held repaired:\n"
        f"{format_counters(numbers)}"
    )
    assert identity_holds(numbers), format_counters(numbers)
    assert numbers["used_slots"] == 2  # the two layers of this test
    before, after = repair_changes_nothing(handle)
    assert before == after
    depths = sum(info.depth for info in channels(handle).values())
    assert depths == numbers["queued"]
    for outcome in ("received", "expired", "dropped_full", "dropped_dead", "flushed"):
        assert numbers[outcome] > 0, f"the soak never exercised {outcome}"

    lines = (tmp_path / "received").read_text().splitlines()
    repeats = [k for k, n in collections.Counter(lines).items() if n > 1]
    assert not repeats, f"received twice on one channel: {repeats[:5]}"
    # Each death may lose the log line of the one message it had just
    # taken, never more; and the log never holds more than was received.
    assert len(lines) <= numbers["received"]
    assert numbers["received"] - len(lines) <= kills + self_kills + WORKERS
