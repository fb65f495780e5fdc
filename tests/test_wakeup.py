"""Waiting: a process with nothing to receive uses no CPU, and wake-ups reach
it from any thread, any event loop, a forked child or another process."""

import asyncio
import os
import sys
import threading

import pytest
from asgiref.sync import async_to_sync
from dmb_tools import (
    identity_holds,
    peers,
    slots,
    stats,
    wait_until,
    wait_until_async,
    waiting_on,
)

from dmb.wakeup import ALL, Doorbell, Ringer

TEST_SIZE = 4 * 1024 * 1024
#: A wake-up that takes longer than this has been lost, not delayed.
DEADLINE = 5


def config_of(prefix):
    return {"prefix": prefix, "size": TEST_SIZE}


# CPU while idle.


@pytest.mark.timeout(150)
async def test_idle_process_with_100_pending_receives_uses_no_cpu(make_layer, prefix):
    layer = make_layer()
    window = 10
    async with peers() as start:
        idle = await start(
            "idle",
            config_of(prefix),
            receives=100,
            window=window,
            windows=3,
            tag="cpu",
            timeout=30,
        )
        names = await idle.expect("waiting", 30)
        assert len(names) == 100
        await wait_until_async(
            lambda: waiting_on(layer.segment_name, names, idle.pid),
            10,
            "the idle process to wait on all 100 channels",
        )
        cpu = await idle.expect("cpu", 3 * window + 30)
        total = cpu["user"] + cpu["system"]
        sys.stderr.write(
            f"\nidle CPU over {window} s with 100 pending receives: ran "
            f"{cpu['run']:.6f} s by the scheduler; getrusage {total:.6f} s "
            f"(user {cpu['user']:.6f}, system {cpu['system']:.6f}); scheduled "
            f"{cpu['scheduled']} times, {cpu['voluntary_switches']} voluntary "
            f"switches\n"
        )
        run = cpu["run"]
        assert f"{run:.2f}" == "0.00", (
            f"idle process ran {run:.4f} s of CPU; every window: {cpu['windows']}"
        )
        # The receives were really pending: each gets its message now.
        for i, name in enumerate(names):
            await layer.send(name, {"type": "wake", "i": i})
        received = await idle.expect("received", 30)
        assert [m["i"] for m in received] == list(range(100))
        await idle.finish()
    assert identity_holds(stats(layer.segment_name))


# Threads and event loops.


@pytest.mark.timeout(60)
def test_async_to_sync_from_eight_threads_at_once(make_layer):
    layer = make_layer()
    names = [f"thread.{i}" for i in range(8)]
    barrier = threading.Barrier(8)
    results, errors = {}, []

    def worker(i):
        try:
            barrier.wait(DEADLINE)
            # All eight wait at once, each in a loop of its own.
            first = async_to_sync(layer.receive)(names[i])
            echoes = []
            for k in range(50):
                async_to_sync(layer.send)(names[i], {"type": "echo", "k": k})
                echoes.append(async_to_sync(layer.receive)(names[i])["k"])
            async_to_sync(layer.group_add)("threads", names[i])
            results[i] = (first, echoes)
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    wait_until(
        lambda: waiting_on(layer.segment_name, names, os.getpid()) or errors,
        DEADLINE * 2,
        "eight threads to wait at once",
    )
    for i, name in enumerate(names):
        layer.send_sync(name, {"type": "start", "i": i})
    for thread in threads:
        thread.join(DEADLINE * 4)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    for i in range(8):
        first, echoes = results[i]
        assert first == {"type": "start", "i": i}
        assert echoes == list(range(50))
    layer.group_send_sync("threads", {"type": "all"})
    assert stats(layer.segment_name)["queued"] == 8


@pytest.mark.timeout(60)
def test_eight_threads_each_running_their_own_loop_wait_at_once(make_layer):
    layer = make_layer()
    sender = make_layer()
    names = [f"loop.{i}" for i in range(8)]
    results, errors = {}, []

    async def wait_and_answer(i):
        message = await asyncio.wait_for(layer.receive(names[i]), DEADLINE * 2)
        await layer.send(f"answer.{i}", {"type": "answer", "i": message["i"]})
        return message

    def worker(i):
        try:
            results[i] = asyncio.run(wait_and_answer(i))
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    wait_until(
        lambda: waiting_on(layer.segment_name, names, os.getpid()) or errors,
        DEADLINE * 2,
        "eight event loops to wait at once",
    )
    for i, name in enumerate(reversed(names)):
        sender.send_sync(name, {"type": "go", "i": 7 - i})
    for thread in threads:
        thread.join(DEADLINE * 3)
    assert not errors, errors
    assert results == {i: {"type": "go", "i": i} for i in range(8)}

    async def collect():
        return [await layer.receive(f"answer.{i}") for i in range(8)]

    answers = asyncio.run(asyncio.wait_for(collect(), DEADLINE))
    assert [a["i"] for a in answers] == list(range(8))


@pytest.mark.timeout(60)
def test_layer_built_in_one_loop_works_in_another(make_layer):
    async def first_loop():
        layer = make_layer()  # built while this loop runs
        other = make_layer()
        channel = await layer.new_channel()
        await layer.group_add("loops", channel)
        task = asyncio.ensure_future(layer.receive(channel))
        await wait_until_async(
            lambda: waiting_on(layer.segment_name, [channel], os.getpid()),
            DEADLINE,
            "a receive in the first loop",
        )
        await other.send(channel, {"type": "first"})  # wakes through the FIFO
        assert await asyncio.wait_for(task, DEADLINE) == {"type": "first"}
        return layer, other, channel

    layer, other, channel = asyncio.run(first_loop())

    async def second_loop():
        task = asyncio.ensure_future(layer.receive(channel))
        await wait_until_async(
            lambda: waiting_on(layer.segment_name, [channel], os.getpid()),
            DEADLINE,
            "a receive in the second loop",
        )
        await other.group_send("loops", {"type": "second"})
        return await asyncio.wait_for(task, DEADLINE)

    assert asyncio.run(second_loop()) == {"type": "second"}

    # And in a third loop, in another thread, with a send from the main one.
    box = {}

    def third():
        box["got"] = asyncio.run(asyncio.wait_for(layer.receive(channel), DEADLINE))

    thread = threading.Thread(target=third)
    thread.start()
    wait_until(
        lambda: waiting_on(layer.segment_name, [channel], os.getpid()),
        DEADLINE,
        "a receive in the third loop",
    )
    other.send_sync(channel, {"type": "third"})
    thread.join(DEADLINE)
    assert box.get("got") == {"type": "third"}


# Processes.


@pytest.mark.timeout(60)
async def test_forked_child_takes_its_own_slot_and_both_receive(make_layer, prefix):
    layer = make_layer()
    async with peers() as start:
        forker = await start("fork", config_of(prefix), timeout=DEADLINE * 2)
        line = await forker.next(40)
        await forker.finish()
    parent_pid, child_pid = line["parent_pid"], line["child_pid"]
    before, after, child = line["before"], line["parent_after"], line["child"]
    assert line["child_status"] == 0
    assert before["pid"] == parent_pid
    assert after == before, "the fork disturbed the parent's slot"
    assert child["slot"]["pid"] == child_pid
    assert child["slot"]["slot"] != before["slot"]
    assert child["slot"]["client"] != before["client"]
    assert child["channel"].split("!")[0].endswith(child["slot"]["client"])
    assert line["parent_channel"].split("!")[0].endswith(before["client"])
    assert line["parent_got"] == {"type": "from.child", "pid": child_pid}
    assert child["got"] == {"type": "from.parent", "pid": parent_pid}
    assert child["foreign"] == "ForeignChannel"
    name = layer.segment_name
    assert {s["pid"] for s in slots(name)} == {os.getpid()}
    assert identity_holds(stats(name))


@pytest.mark.timeout(60)
async def test_wake_up_crosses_processes_to_a_waiting_peer(make_layer, prefix):
    layer = make_layer()
    async with peers() as start:
        waiter = await start("wait_receive", config_of(prefix), timeout=30)
        channel = await waiter.expect("waiting", 30)
        await wait_until_async(
            lambda: waiting_on(layer.segment_name, [channel], waiter.pid),
            DEADLINE * 2,
            "the peer to wait",
        )
        await layer.send(channel, {"type": "across"})
        assert await waiter.expect("message", DEADLINE) == {"type": "across"}
        await waiter.finish()


@pytest.mark.timeout(60)
async def test_wake_up_crosses_processes_from_a_sending_peer(make_layer, prefix):
    layer = make_layer()
    specific = await layer.new_channel()
    async with peers() as start:
        senders = [
            await start(
                "send",
                config_of(prefix),
                channel=channel,
                messages=[{"type": "from.peer", "to": channel}],
            )
            for channel in ("wake.normal", specific)
        ]
        tasks = [
            asyncio.ensure_future(layer.receive(c)) for c in ("wake.normal", specific)
        ]
        await wait_until_async(
            lambda: waiting_on(
                layer.segment_name, ["wake.normal", specific], os.getpid()
            ),
            DEADLINE,
            "this process to wait",
        )
        for sender in senders:
            await sender.tell(go=True)
        got = await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)
        assert got == [
            {"type": "from.peer", "to": "wake.normal"},
            {"type": "from.peer", "to": specific},
        ]
        for sender in senders:
            await sender.finish()


# The wake-up FIFOs themselves.


def test_doorbell_hears_the_channels_rung(tmp_path):
    bell = Doorbell(str(tmp_path / "bell"))
    ringer = Ringer(lambda token: str(tmp_path / "bell"))
    try:
        assert bell.take_reasons() == set()
        for reason in (3, 5, 3):
            assert ringer.ring(1, reason)
        assert bell.take_reasons() == {3, 5}
        assert bell.take_reasons() == set()
    finally:
        ringer.close()
        bell.close()
    assert not os.path.exists(tmp_path / "bell")


def test_doorbell_that_overflows_asks_to_look_at_everything(tmp_path):
    bell = Doorbell(str(tmp_path / "bell"))
    ringer = Ringer(lambda token: str(tmp_path / "bell"))
    try:
        for i in range(40000):  # more than a pipe holds
            assert ringer.ring(1, i % 7)
        assert ALL in bell.take_reasons()
        assert bell.take_reasons() == set()
    finally:
        ringer.close()
        bell.close()


def test_ringing_a_gone_process_reports_it(tmp_path):
    ringer = Ringer(lambda token: str(tmp_path / f"bell{token}"))
    try:
        assert not ringer.ring(1, 0), "a FIFO that does not exist"
        os.mkfifo(tmp_path / "bell2")
        assert not ringer.ring(2, 0), "a FIFO nobody reads"
        bell = Doorbell(str(tmp_path / "bell3"))
        assert ringer.ring(3, 0)
        bell.close(unlink=False)  # its owner died; the path stays
        assert not ringer.ring(3, 0), "a FIFO whose reader is gone"
    finally:
        ringer.close()
