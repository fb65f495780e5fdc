"""BR-13: segment lifecycle: racing start-up, zeroed or mismatched segment,
flush() scope."""

import asyncio
import fcntl
import signal

import posix_ipc
import pytest

import dmb.segment
from dmb.segment import MIN_SIZE, segment_name

from .support import (
    SPAWN,
    TEST_SIZE,
    br13_bigger,
    br13_boot_receiver,
    br13_boot_sender,
    br13_die_busy,
    br13_flush_b,
    br13_flush_c,
    br13_round_trip,
    br13_small,
    remove_segment,
    segment_counts,
)

pytestmark = pytest.mark.asyncio

SENDERS = 16
ROUNDS = 20


@pytest.mark.timeout(300)
async def test_br13_racing_startup(new_prefix, children):
    prefix = new_prefix("race")  # and no segment exists for it yet
    for round_ in range(ROUNDS):
        barrier = SPAWN.Barrier(SENDERS + 1, timeout=60)
        receiver = children.start(
            br13_boot_receiver, prefix, barrier, SENDERS, name=f"recv{round_}"
        )
        senders = [
            children.start(br13_boot_sender, prefix, barrier, name=f"s{round_}.{n}")
            for n in range(SENDERS)
        ]
        pids = await receiver.expect("result", timeout=60)
        for link in senders:
            await link.expect("result", timeout=30)
        await children.join([receiver, *senders], timeout=30)
        sender_pids = {link.proc.pid for link in senders}
        assert len(pids) == SENDERS, (round_, pids)
        assert set(pids) == sender_pids, round_
        remove_segment(prefix)


@pytest.mark.timeout(60)
async def test_br13_creator_that_loses_the_lock_race_attaches(make_layer, monkeypatch):
    """The one interleaving of a racing start-up that rounds rarely hit.

    X makes the object; before X takes the creation lock, Y opens the
    object, formats it and uses it.  X must then attach to what Y made,
    not format it a second time under Y's feet.
    """
    real_flock = fcntl.flock
    interleaved = []

    def flock(fd, operation):
        if operation == fcntl.LOCK_EX and not interleaved:
            interleaved.append(None)  # only X's first lock; Y's goes through
            # Y, whole, between X's create and X's lock.
            interleaved[0] = make_layer()
            interleaved[0].send_sync("q", {"from": "Y"})
        return real_flock(fd, operation)

    monkeypatch.setattr(dmb.segment.fcntl, "flock", flock)
    late = make_layer()  # X
    monkeypatch.setattr(dmb.segment.fcntl, "flock", real_flock)
    (early,) = interleaved
    assert await asyncio.wait_for(late.receive("q"), 1.0) == {"from": "Y"}
    # Y is still attached, in a slot of its own: each reaches the other.
    for sender, receiver in ((late, early), (early, late)):
        channel = await receiver.new_channel()
        await sender.send(channel, {"type": "t"})
        assert await asyncio.wait_for(receiver.receive(channel), 1.0) == {"type": "t"}


def _make_leftover(prefix, size):
    """A shared-memory object under the layer's name, all zero bytes."""
    shm = posix_ipc.SharedMemory(
        segment_name(prefix), posix_ipc.O_CREX, mode=0o600, size=size
    )
    shm.close_fd()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [TEST_SIZE, 0], ids=["zeroed", "empty"])
async def test_br13_leftover_segment(prefix, children, size):
    _make_leftover(prefix, size)
    # In a child, so a SIGBUS would show as its exit code, not kill the run.
    child = children.start(br13_round_trip, prefix, TEST_SIZE, name="B")
    result = await child.expect("result", timeout=30)
    await asyncio.to_thread(child.proc.join, 10)
    assert child.proc.exitcode != -signal.SIGBUS
    assert child.proc.exitcode == 0
    if "refused" in result:
        # Allowed only as a clear error that names the segment and the cure.
        text = result["refused"]
        assert segment_name(prefix) in text, text
        assert "remove" in text or "unlink" in text, text
    else:
        assert result["got"] == {"type": "t", "n": 1}


@pytest.mark.timeout(60)
async def test_br13_leftover_segment_of_a_killed_run(make_layer, prefix, children):
    """The same kind of leftover as a rerun meets: a whole segment whose
    only process was killed.  It opens, and what was queued on a normal
    channel is still there (the segment outlives its processes)."""
    dead = children.start(br13_die_busy, prefix, TEST_SIZE, name="previous")
    gone = await dead.expect("channel")
    dead.proc.kill()
    await asyncio.to_thread(dead.proc.join, 10)
    assert dead.proc.exitcode == -signal.SIGKILL
    layer = make_layer()
    assert await asyncio.wait_for(layer.receive("q"), 1.0) == {"type": "kept"}
    # The dead process's channel and membership went with it.
    member = await layer.new_channel()
    await layer.group_add("g", member)
    await layer.group_send("g", {"type": "g"})
    assert await asyncio.wait_for(layer.receive(member), 1.0) == {"type": "g"}
    await layer.send(gone, {"type": "to the dead"})
    assert segment_counts(layer)["queued"] == 0  # both its messages dropped
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "t"})
    assert await asyncio.wait_for(layer.receive(channel), 1.0) == {"type": "t"}


@pytest.mark.timeout(60)
async def test_br13_settings_mismatch(prefix, children):
    a = children.start(br13_small, prefix, MIN_SIZE, name="A")
    a_info = await a.expect("channel")
    b = children.start(br13_bigger, prefix, 16 * TEST_SIZE, a_info["channel"], name="B")
    b_result = await b.expect("result", timeout=30)
    if "refused" in b_result:
        # Allowed if it names the mismatch; A's message must still be there.
        text = b_result["refused"]
        assert "size" in text, text
        a.tell("next", "read")
        a_result = await a.expect("result")
        assert a_result["pending"] == {"type": "pending"}
    else:
        assert b_result["pending"] == {"type": "pending"}
        assert b_result["pong"] == {"type": "pong"}
        # B works within the geometry already there, limits included.
        assert b_result["max"] <= a_info["max"], (b_result, a_info)
        explicit = b_result["explicit"]
        if isinstance(explicit, str):
            assert "ConfigError" in explicit and "max_message_size" in explicit
            assert segment_name(prefix) in explicit, explicit
        else:
            assert explicit <= a_info["max"], explicit
        a.tell("next", "done")
        a_result = await a.expect("result")
        assert a_result["ping"]["type"] == "ping"
    await children.join([a, b], timeout=10)


@pytest.mark.timeout(60)
async def test_br13_flush_scope(make_layer, prefix, new_prefix, children):
    other = new_prefix("p2")
    a = make_layer()  # process A, prefix p1
    b = children.start(br13_flush_b, prefix, name="B")
    c = children.start(br13_flush_c, other, name="C")
    await b.expect("ready")
    await c.expect("ready")
    await a.send("q", {"n": "p1"})  # left pending under p1

    await a.flush()
    b.tell("flushed")
    c.tell("flushed")
    assert await b.expect("q") is None  # the pending message is gone

    await a.group_send("g", {"n": "after"})
    await a.send("q", {"n": "fresh"})
    await a.send("q2", {"n": "q2"})
    b.tell("sent")
    got = await b.expect("result")
    assert got["alive"]
    assert got["group"] is None  # the group was flushed with the rest
    assert got["fresh"] == {"n": "fresh"}
    assert got["q2"] == {"n": "q2"}
    # A itself sends and receives at once.
    await a.send("fresh-a", {"n": 1})
    assert await asyncio.wait_for(a.receive("fresh-a"), 1.0) == {"n": 1}

    got = await c.expect("result")
    assert got["pending"] == {"n": "p2"}
    assert got["group"] == {"n": "p2-group"}
    await children.join([b, c], timeout=10)
