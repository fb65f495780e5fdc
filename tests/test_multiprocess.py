"""Real processes on one segment: competing receivers, groups across
processes, and processes killed with SIGKILL in the middle of a stream.

Every test ends by checking the segment's accounting identity:
sent == received + expired + dropped_full + dropped_dead + flushed + queued.
"""

import asyncio
import time

import pytest
from channels.exceptions import ChannelFull
from dmb_tools import (
    channels,
    describe_identity,
    identity_holds,
    peers,
    slot_of,
    stats,
    wait_until_async,
    waiting_on,
)

TEST_SIZE = 4 * 1024 * 1024
DEADLINE = 5


def config_of(prefix, **extra):
    return {"prefix": prefix, "size": TEST_SIZE, **extra}


async def send_with_backpressure(layer, channel, message, deadline=10):
    """Send, retrying while the channel is full, as a producer would."""
    give_up = time.monotonic() + deadline
    while True:
        try:
            await layer.send(channel, message)
            return
        except ChannelFull:
            if time.monotonic() > give_up:
                raise AssertionError(
                    f"{channel!r} stayed full for {deadline} s"
                ) from None
            await asyncio.sleep(0.002)


def assert_identity(name, **expected):
    counts = stats(name)
    assert identity_holds(counts), describe_identity(counts)
    for key, value in expected.items():
        assert counts[key] == value, f"{key}: {counts[key]} != {value}"
    return counts


def ascending(ids):
    return all(a < b for a, b in zip(ids, ids[1:]))


@pytest.mark.timeout(120)
async def test_competing_receivers_get_each_of_10000_messages_exactly_once(
    make_layer, prefix
):
    config = config_of(prefix, capacity=500)
    layer = make_layer(**config)
    count, receivers = 10_000, 3
    async with peers() as start:
        drains = [
            await start("drain", config, channel="work.queue", timeout=60)
            for _ in range(receivers)
        ]
        for drain in drains:
            assert await drain.expect("channel", 30) == "work.queue"
        await wait_until_async(
            lambda: all(
                waiting_on(layer.segment_name, ["work.queue"], d.pid) for d in drains
            ),
            30,
            "every receiver to wait on the queue",
        )
        for i in range(count):
            await send_with_backpressure(layer, "work.queue", {"type": "m", "id": i})
        for _ in range(receivers):
            await send_with_backpressure(layer, "work.queue", {"type": "stop"})
        results = [await drain.expect("ids", 60) for drain in drains]
        for drain in drains:
            await drain.finish()
    every = sorted(i for ids in results for i in ids)
    assert every == list(range(count)), "a message was lost or delivered twice"
    for ids in results:
        assert ascending(ids), "a receiver got a channel's messages out of order"
    assert_identity(layer.segment_name, received=count + receivers, queued=0)


@pytest.mark.timeout(60)
async def test_group_spanning_channels_of_four_processes(make_layer, prefix):
    layer = make_layer()
    count = 25
    async with peers() as start:
        members = [
            await start(
                "join",
                config_of(prefix),
                group="span",
                channels=2,
                expect=count,
                timeout=30,
            )
            for _ in range(4)
        ]
        names = [await member.expect("channels", 30) for member in members]
        own = await layer.new_channel()
        await layer.group_add("span", own)
        all_channels = [own] + [c for pair in names for c in pair]
        assert len(set(all_channels)) == 9
        for i in range(count):
            await layer.group_send("span", {"type": "g", "i": i})
        got = [await member.expect("messages", 30) for member in members]
        for member in members:
            await member.finish()
    expected = [{"type": "g", "i": i} for i in range(count)]
    for pair, messages in zip(names, got):
        assert set(messages) == set(pair)
        for channel in pair:
            assert messages[channel] == expected
    assert [await layer.receive(own) for _ in range(count)] == expected
    assert_identity(layer.segment_name, sent=9 * count, received=9 * count, queued=0)


@pytest.mark.timeout(60)
async def test_receive_on_another_processes_specific_channel_fails_at_once(
    make_layer, prefix
):
    layer = make_layer()
    channel = await layer.new_channel()
    async with peers() as start:
        thief = await start(
            "try_receive", config_of(prefix), channel=channel, timeout=20
        )
        error = await thief.next(40)
        await thief.finish()
    assert error.get("error") == "ForeignChannel", error
    assert "ValueError" in error["bases"]
    assert channel in error["text"]
    assert "another process" in error["text"]


@pytest.mark.timeout(60)
async def test_normal_channel_messages_outlive_the_process_that_sent_them(
    make_layer, prefix
):
    layer = make_layer()
    async with peers() as start:
        sender = await start(
            "send",
            config_of(prefix),
            channel="durable.queue",
            messages=[{"type": "m", "id": i} for i in range(5)],
        )
        await sender.tell(go=True)
        assert await sender.expect("sent", 30) == 5
        await sender.finish()
        receiver = await start(
            "drain", config_of(prefix), channel="durable.queue", timeout=30
        )
        await layer.send("durable.queue", {"type": "stop"})
        assert await receiver.expect("ids", 30) == list(range(5))
        await receiver.finish()
    assert_identity(layer.segment_name, received=6, queued=0)


@pytest.mark.timeout(120)
async def test_sigkill_of_a_receiver_mid_stream_leaves_the_rest_running(
    make_layer, prefix
):
    config = config_of(prefix, capacity=100)
    layer = make_layer(**config)
    name = layer.segment_name
    rounds, kill_at = 600, 200
    async with peers() as start:
        drains = [
            await start("drain", config, timeout=60, report_each=True) for _ in range(3)
        ]
        channels = [await drain.expect("channel", 30) for drain in drains]
        victim, survivors = drains[0], drains[1:]
        victim_got = []

        async def send_round(i):
            for channel in channels:
                await send_with_backpressure(layer, channel, {"type": "m", "id": i})

        for i in range(kill_at):
            await send_round(i)
        while len(victim_got) < 50:
            victim_got.append(await victim.expect("got", 30))
        victim.kill()  # in mid-stream: more is queued for it, more will come
        for i in range(kill_at, rounds):
            await send_round(i)
        for channel in channels:
            await send_with_backpressure(layer, channel, {"type": "stop"})
        results = [await s.expect("ids", 60) for s in survivors]
        for survivor in survivors:
            await survivor.finish()
        # What it printed before it died.
        victim_got += [line["got"] for line in await victim.died() if "got" in line]
    for ids in results:
        assert ids == list(range(rounds)), "a survivor lost or reordered messages"
    assert victim_got == list(range(len(victim_got)))
    await wait_until_async(
        lambda: slot_of(name, victim.pid) is None,
        DEADLINE,
        "the dead receiver's slot to be reclaimed",
    )
    counts = assert_identity(name, queued=0)
    survivors_received = 2 * (rounds + 1)
    victim_received = counts["received"] - survivors_received
    assert victim_received >= len(victim_got)
    # Everything sent to the victim that it did not take was dropped as dead.
    assert counts["dropped_dead"] == (rounds + 1) - victim_received
    assert counts["dropped_dead"] > 0


@pytest.mark.timeout(60)
async def test_sigkill_of_a_busy_receiver_is_noticed_by_its_senders(make_layer, prefix):
    """A receiver killed while busy (not waiting) gets no failed wake-up;
    its full channel must still not refuse sends for ever."""
    config = config_of(prefix, capacity=10)
    layer = make_layer(**config)
    name = layer.segment_name
    async with peers() as start:
        slow = await start("drain", config, timeout=60, report_each=True, pace=0.05)
        channel = await slow.expect("channel", 30)
        for i in range(20):
            await send_with_backpressure(layer, channel, {"type": "m", "id": i})
        assert await slow.expect("got", 30) == 0
        slot = slot_of(name, slow.pid)
        assert slot not in channels(name)[channel]["waiting_slots"]
        slow.kill()
        taken = [line["got"] for line in await slow.died() if "got" in line]
        for i in range(20, 60):
            await send_with_backpressure(layer, channel, {"type": "m", "id": i})
    assert slot_of(name, slow.pid) is None
    counts = assert_identity(name, queued=0)
    assert counts["received"] >= 1 + len(taken)
    assert counts["dropped_dead"] == 60 - counts["received"]


async def collect(layer, channel, timeout=60):
    """Receive until a "stop"; return the (src, id) pairs in arrival order."""
    got = []
    while True:
        message = await asyncio.wait_for(layer.receive(channel), timeout)
        if message["type"] == "stop":
            return got
        got.append((message["src"], message["id"]))


def check_streams(arrivals, complete, cut):
    """Each source's messages: once each, in order, and none missing.

    ``complete`` maps sources that finished to their counts; ``cut`` names
    the source killed part-way, whose ids must be 0..k-1 for some k.
    """
    by_source = {}
    for receiver in arrivals:
        mine = {}
        for src, i in receiver:
            mine.setdefault(src, []).append(i)
        for src, ids in mine.items():
            assert ascending(ids), f"{src}'s messages arrived out of order"
            by_source.setdefault(src, []).extend(ids)
    for src, count in complete.items():
        assert sorted(by_source[src]) == list(range(count)), src
    killed = sorted(by_source.get(cut, []))
    assert killed == list(range(len(killed))), "the killed sender's stream has a gap"
    return len(killed)


async def run_two_senders_one_killed(layer, prefix, config, killed_spec):
    """Two senders stream to one queue, drained here and by a peer; one sender
    is killed.  Returns (arrivals, killed peer's count received, its pid)."""
    count = 2000
    async with peers() as start:
        drain = await start("drain_pairs", config, channel="jobs", timeout=60)
        # Paced, so that both are still sending when one is killed.
        doomed = await start(
            "send_stream",
            config,
            channels=["jobs"],
            count=count,
            tag="doomed",
            wait_for_go=True,
            report_every=50,
            pace=0.001,
            **killed_spec,
        )
        steady = await start(
            "send_stream",
            config,
            channels=["jobs"],
            count=count,
            tag="steady",
            wait_for_go=True,
            report_every=500,
            pace=0.001,
        )
        await drain.expect("channel", 30)
        here = asyncio.ensure_future(collect(layer, "jobs"))
        await doomed.tell(go=True)
        await steady.tell(go=True)
        if "crash_after" not in killed_spec:
            while await doomed.expect("sent", 30) < 500:
                pass
            doomed.kill()
        assert await steady.expect("done", 90) == count
        await asyncio.wait_for(doomed.proc.wait(), 30)
        for _ in range(2):
            await send_with_backpressure(layer, "jobs", {"type": "stop"})
        arrivals = [await asyncio.wait_for(here, 60), await drain.expect("pairs", 60)]
        await drain.finish()
        await steady.finish()
        await doomed.reap()
    cut = check_streams(arrivals, {"steady": count}, "doomed")
    return cut, doomed.pid


@pytest.mark.timeout(120)
async def test_sigkill_of_a_sender_mid_stream_leaves_the_rest_running(
    make_layer, prefix
):
    config = config_of(prefix, capacity=200)
    layer = make_layer(**config)
    cut, pid = await run_two_senders_one_killed(layer, prefix, config, {})
    assert 500 <= cut < 2000, "the sender was not killed in mid-stream"
    make_layer()  # a process that attaches sweeps the dead from the table
    assert slot_of(layer.segment_name, pid) is None
    assert_identity(layer.segment_name, queued=0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "point, delivered",
    [(1, 700), (2, 701)],
    ids=["before-linking", "after-linking"],
)
async def test_sender_killed_holding_the_segment_lock_leaves_the_rest_running(
    make_layer, prefix, point, delivered
):
    """SIGKILL inside the C core, lock held, half-way through send 700:
    before its message is linked in (it leaves no trace), or just after
    (it is delivered, and repair counts it as sent)."""
    config = config_of(prefix, capacity=200)
    layer = make_layer(**config)
    cut, pid = await run_two_senders_one_killed(
        layer, prefix, config, {"crash_after": 700, "crash_point": point}
    )
    assert cut == delivered
    counts = assert_identity(layer.segment_name, queued=0)
    assert counts["repairs"] >= 1
    make_layer()
    assert slot_of(layer.segment_name, pid) is None
