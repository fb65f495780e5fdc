"""BR-01: a cancelled receive() must not lose, reorder or wedge messages."""

import asyncio
import time

import pytest

from .support import TEST_SIZE, br01_siblings, drain

pytestmark = pytest.mark.asyncio

# A 1 s receive timeout may end a little late on a loaded machine; this
# much lateness still tells "timed out" from "hung".
TIMEOUT_SLACK = 1.0


@pytest.mark.timeout(60)
async def test_br01_cancel_at_growing_delays_loses_nothing(make_layer):
    layer = make_layer(capacity=1000)
    channel = await layer.new_channel()
    out = []  # every message in the order it came out of the layer
    for i in range(200):
        await layer.send(channel, {"type": "t", "seq": i})
        task = asyncio.ensure_future(layer.receive(channel))
        await asyncio.sleep(i * 50e-6)  # 0 to ~10 ms
        task.cancel()
        try:
            out.append(await task)  # it finished before the cancel landed
        except asyncio.CancelledError:
            pass
    while True:
        started = time.monotonic()
        try:
            out.append(await asyncio.wait_for(layer.receive(channel), 1.0))
        except TimeoutError:
            assert time.monotonic() - started < 1.0 + TIMEOUT_SLACK
            break
    seqs = [message["seq"] for message in out]
    assert seqs == list(range(200)), seqs
    assert all(message == {"type": "t", "seq": message["seq"]} for message in out)


@pytest.mark.timeout(60)
async def test_br01_cancel_between_wake_up_and_take_loses_nothing(make_layer):
    """The same, with the receive already waiting when the message lands.

    Cancelling with no sleep at all lands after the wake-up and before the
    woken receive runs: the window in which a layer that pulls first and
    hands over later loses the message.
    """
    layer = make_layer(capacity=1000)
    channel = await layer.new_channel()
    out = []
    cancelled = 0
    for i in range(200):
        task = asyncio.ensure_future(layer.receive(channel))
        await asyncio.sleep(0)  # let it start waiting
        await layer.send(channel, {"type": "t", "seq": i})
        if i % 2:
            await asyncio.sleep((i // 2) * 100e-6)
        task.cancel()
        try:
            out.append(await task)
        except asyncio.CancelledError:
            cancelled += 1
    out.extend(await drain(layer, channel, idle=1.0))
    assert [message["seq"] for message in out] == list(range(200))
    assert cancelled > 0  # the window was really hit


@pytest.mark.timeout(90)
async def test_br01_sibling_channels_survive_a_reconnecting_one(
    make_layer, prefix, children
):
    count = 5000
    config = {"capacity": 10_000, "size": 4 * TEST_SIZE}
    sender = make_layer(**config)
    receiver = children.start(br01_siblings, prefix, config, count, name="R")
    await receiver.expect("ready", timeout=60)
    started = time.monotonic()
    for i in range(count):
        # One call per millisecond, on a schedule, so a late wake-up is
        # caught up instead of stretching the run.
        delay = started + i * 0.001 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await sender.group_send("room", {"type": "t", "seq": i})
    receiver.tell("sent")
    logs = await receiver.expect("result", timeout=60)
    await children.join([receiver], timeout=10)
    expected = list(range(count))
    for name in ("a", "b", "c"):
        got = logs[name]
        missing = sorted(set(expected) - set(got))
        assert got == expected, (
            f"channel {name}: {len(got)} messages, missing {missing[:20]}, "
            f"out of order at {_first_disorder(got)}"
        )
    assert logs["unfinished"] == 0
    # The scenario only means something if receives really were cancelled.
    assert logs["cancels"] > 0


def _first_disorder(seqs):
    for index in range(1, len(seqs)):
        if seqs[index] <= seqs[index - 1]:
            return index
    return None


@pytest.mark.timeout(60)
async def test_br01_timed_receive_on_empty_channel_stays_live(make_layer):
    layer = make_layer()
    for _ in range(5):  # the reported hang was intermittent
        fresh = await layer.new_channel()
        await _times_out_promptly(layer, fresh)
        started = time.monotonic()
        await layer.send(fresh, {"type": "t", "n": 1})
        got = await asyncio.wait_for(layer.receive(fresh), 1.0)
        assert got == {"type": "t", "n": 1}
        assert time.monotonic() - started < 0.1

        # Again, while two other local channels have receives waiting.
        others = [await layer.new_channel() for _ in range(2)]
        waiting = [asyncio.ensure_future(layer.receive(o)) for o in others]
        await asyncio.sleep(0.01)
        assert not any(task.done() for task in waiting)
        await _times_out_promptly(layer, fresh)
        for n, other in enumerate(others):
            await layer.send(other, {"type": "t", "n": n})
        got = await asyncio.wait_for(asyncio.gather(*waiting), 1.0)
        assert got == [{"type": "t", "n": 0}, {"type": "t", "n": 1}]
        # Nothing was left over anywhere.
        for channel in [fresh, *others]:
            assert await drain(layer, channel, idle=0.05) == []


async def _times_out_promptly(layer, channel):
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(layer.receive(channel), 0.2)
    assert time.monotonic() - started < 0.5
