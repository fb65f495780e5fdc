"""Expiry of messages and group memberships; cancelled receives."""

import asyncio
import random

import pytest

from ._support import assert_no_message, needs, recv, xfail_backend

pytestmark = pytest.mark.asyncio

# Redis expires by whole seconds, so wait past two of them.
PAST_ONE_SECOND_EXPIRY = 2.2


@pytest.mark.timeout(20)
@needs("expiry")
async def test_expired_message_is_never_delivered(backend):
    layer = backend.make(expiry=1)
    specific = await layer.new_channel()
    # An old message on a channel that gets nothing newer...
    await layer.send("conformance.stale", {"type": "test.old"})
    # ...and on channels that get a newer message after the expiry.
    await layer.send(specific, {"type": "test.old"})
    await layer.send("conformance.normal", {"type": "test.old"})
    await asyncio.sleep(PAST_ONE_SECOND_EXPIRY)
    await layer.send(specific, {"type": "test.new"})
    await layer.send("conformance.normal", {"type": "test.new"})
    await assert_no_message(layer, "conformance.stale")
    for channel in (specific, "conformance.normal"):
        assert await recv(layer, channel) == {"type": "test.new"}, channel
        await assert_no_message(layer, channel)


@pytest.mark.timeout(20)
@needs("expiry", "foreign_members")
@xfail_backend(
    "inmemory",
    "InMemoryChannelLayer drops a channel from every group once one of its "
    "messages expires",
)
async def test_expired_group_message_is_never_delivered(backend):
    layer = backend.make(expiry=1)
    await layer.group_add("expiring", "conformance.member")
    await layer.group_send("expiring", {"type": "test.old"})
    await asyncio.sleep(PAST_ONE_SECOND_EXPIRY)
    await layer.group_send("expiring", {"type": "test.new"})
    assert await recv(layer, "conformance.member") == {"type": "test.new"}
    await assert_no_message(layer, "conformance.member")


@pytest.mark.timeout(20)
@needs("group_expiry")
async def test_group_membership_expires(backend):
    layer = backend.make(group_expiry=1)
    old_member = await layer.new_channel()
    await layer.group_add("short-lived", old_member)
    await asyncio.sleep(PAST_ONE_SECOND_EXPIRY)
    new_member = await layer.new_channel()
    await layer.group_add("short-lived", new_member)
    await layer.group_send("short-lived", {"type": "test.after"})
    assert await recv(layer, new_member) == {"type": "test.after"}
    await assert_no_message(layer, old_member)


@pytest.mark.timeout(20)
@needs("cancel_safe")
@pytest.mark.parametrize("kind", ["normal", "specific"])
async def test_receive_cancelled_loses_no_message(backend, kind):
    layer = backend.make()
    channel = "conformance.cancel" if kind == "normal" else await layer.new_channel()
    waiting = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0.2)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 5)
    await layer.send(channel, {"type": "test.kept"})
    assert await recv(layer, channel) == {"type": "test.kept"}
    await assert_no_message(layer, channel)


@pytest.mark.timeout(30)
@needs("cancel_safe")
@xfail_backend(
    "redis",
    "RedisChannelLayer drops a message when receive() is cancelled just as "
    "Redis hands it over, before the layer has stored its backup copy; it "
    "hits about one cancellation in a hundred, so this is not strict",
    strict=False,
)
@pytest.mark.parametrize("kind", ["normal", "specific"])
async def test_receive_cancelled_at_any_moment_loses_and_duplicates_nothing(
    backend, kind
):
    """Cancel receives at many points of their run: every message is
    delivered exactly once, to a receive that completed."""
    layer = backend.make(capacity=1000)
    channel = "conformance.race" if kind == "normal" else await layer.new_channel()
    delays = random.Random(20240601)
    received = []
    count = 200
    for n in range(count):
        await layer.send(channel, {"type": "test.race", "n": n})
        task = asyncio.ensure_future(layer.receive(channel))
        await asyncio.sleep(delays.random() * 0.003)
        task.cancel()
        try:
            received.append((await asyncio.wait_for(task, 5))["n"])
        except asyncio.CancelledError:
            pass
    while True:
        try:
            received.append((await recv(layer, channel, timeout=0.5))["n"])
        except asyncio.TimeoutError:
            break
    lost = sorted(set(range(count)) - set(received))
    duplicated = sorted({n for n in received if received.count(n) > 1})
    assert not lost and not duplicated, f"lost {lost}, duplicated {duplicated}"
