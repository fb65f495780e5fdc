"""Threads, event loops and processes sharing one layer."""

import asyncio
import threading

import pytest
from asgiref.sync import async_to_sync

from ._support import assert_no_message, needs, recv, recv_many, xfail_backend


@pytest.mark.timeout(60)
@xfail_backend(
    "redis",
    "RedisChannelLayer binds its receive lock to one event loop: a second "
    "loop receiving at the same time gets RuntimeError",
)
def test_async_to_sync_from_many_threads_each_with_own_loop(backend):
    layer = backend.make()
    threads, rounds = 6, 4
    start = threading.Barrier(threads)
    errors = []

    async def exchange(index, round_):
        channel = await layer.new_channel()
        await layer.group_add(f"thread-{index}", channel)
        await layer.send(channel, {"type": "test.direct", "n": round_})
        await layer.group_send(f"thread-{index}", {"type": "test.group", "n": round_})
        first = await asyncio.wait_for(layer.receive(channel), 5)
        second = await asyncio.wait_for(layer.receive(channel), 5)
        await layer.group_discard(f"thread-{index}", channel)
        assert first == {"type": "test.direct", "n": round_}, first
        assert second == {"type": "test.group", "n": round_}, second

    def worker(index):
        start.wait(10)
        try:
            for round_ in range(rounds):
                async_to_sync(exchange)(index, round_)
        except BaseException as error:
            errors.append(f"thread {index}: {type(error).__name__}: {error}")

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(45)
    assert not any(thread.is_alive() for thread in workers), "a thread hung"
    assert not errors, "; ".join(errors)


@pytest.mark.timeout(30)
@needs("loop_independent")
def test_layer_works_across_successive_event_loops(backend):
    """A layer built outside any loop, used by several loops in turn."""
    layer = backend.make()

    async def prepare():
        channel = await layer.new_channel()
        await layer.group_add("loops", channel)
        await layer.send(channel, {"type": "test.loop", "n": 1})
        return channel

    async def group_send():
        await layer.group_send("loops", {"type": "test.loop", "n": 2})

    async def drain(channel):
        return await recv_many(layer, channel, 2)

    channel = asyncio.run(prepare())
    asyncio.run(group_send())
    received = asyncio.run(drain(channel))
    assert [message["n"] for message in received] == [1, 2]


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_sync_code_reaches_async_consumer_through_async_to_sync(backend):
    """As a Django view does: async_to_sync(group_send) from a sync thread
    while a consumer waits in its own event loop."""
    layer = backend.make()
    channel = await layer.new_channel()
    await layer.group_add("view-updates", channel)

    def view():
        for n in range(3):
            async_to_sync(layer.group_send)(
                "view-updates", {"type": "test.view", "n": n}
            )
        async_to_sync(layer.send)(channel, {"type": "test.view", "n": 3})

    await asyncio.wait_for(asyncio.to_thread(view), 20)
    received = await recv_many(layer, channel, 4)
    assert [message["n"] for message in received] == [0, 1, 2, 3]


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@needs("processes")
async def test_message_sent_in_another_process_is_received(backend):
    layer = backend.make()
    channel = await layer.new_channel()
    messages = [{"type": "test.remote", "n": n} for n in range(20)]
    peer = await backend.start_peer("send", channel=channel, messages=messages)
    assert await peer.read() == {"sent": 20}
    await peer.finish()
    assert await recv_many(layer, channel, 20) == messages
    await assert_no_message(layer, channel)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@needs("processes")
async def test_group_send_reaches_members_in_other_processes(backend):
    layer = backend.make()
    local = await layer.new_channel()
    await layer.group_add("site-wide", local)
    peer = await backend.start_peer("join", group="site-wide", timeout=10)
    remote = (await peer.read())["channel"]
    assert remote != local
    await asyncio.sleep(0.2)  # lets a subscribing backend subscribe
    await layer.group_send("site-wide", {"type": "test.broadcast"})
    assert await recv(layer, local) == {"type": "test.broadcast"}
    assert await peer.read() == {"message": {"type": "test.broadcast"}}
    await peer.finish()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@needs("processes", "specific_names")
async def test_receive_on_another_process_specific_channel_fails_at_once(
    backend,
):
    """Only the process that made a specific channel may receive on it.

    dmb raises dmb.ForeignChannel (a ValueError) at once instead of waiting
    forever; RedisChannelLayer raises AssertionError ("Wrong client
    prefix") at once as well.
    """
    layer = backend.make()
    peer = await backend.start_peer("new_channel")
    foreign = (await peer.read())["channel"]
    try:
        with pytest.raises(Exception) as raised:
            await asyncio.wait_for(layer.receive(foreign), 2)
        assert not isinstance(raised.value, asyncio.TimeoutError), "it waited"
        if backend.name == "dmb":
            assert isinstance(raised.value, backend.dmb.ForeignChannel)
            assert isinstance(raised.value, ValueError)
            assert foreign in str(raised.value)
        else:
            assert isinstance(raised.value, AssertionError)
    finally:
        await peer.finish()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@needs("processes", "single_delivery", "stored_messages")
@xfail_backend(
    "redis",
    "RedisChannelLayer can deliver a message twice when processes receive on "
    "one normal channel at once: each receive() first puts every in-flight "
    "message of the channel back in the queue, including another process's",
)
async def test_normal_channel_message_goes_to_exactly_one_process(backend):
    count = 80
    layer = backend.make()
    peers = [
        await backend.start_peer("drain", channel="conformance.work", idle=1.0)
        for _ in range(2)
    ]
    for n in range(count):
        await layer.send("conformance.work", {"type": "test.job", "n": n})
    for peer in peers:
        assert await peer.read(timeout=20) == {"ready": True}
    for peer in peers:
        await peer.write_line("go")  # both start draining at once
    remote = []
    for peer in peers:
        remote += [m["n"] for m in (await peer.read(timeout=20))["messages"]]
        await peer.finish()
    lost = sorted(set(range(count)) - set(remote))
    duplicated = sorted({n for n in remote if remote.count(n) > 1})
    assert not lost and not duplicated, f"lost {lost}, duplicated {duplicated}"
    await assert_no_message(layer, "conformance.work")
