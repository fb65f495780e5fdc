"""Capacity: ChannelFull, channel_capacity patterns, full group members."""

import re

import pytest
from channels.exceptions import ChannelFull

from ._support import assert_no_message, needs, recv, recv_many, xfail_backend

pytestmark = pytest.mark.asyncio

UNCOMPILED_PATTERNS = (
    "InMemoryChannelLayer stores channel_capacity without compiling it, so "
    "every send fails once a pattern is set"
)


@pytest.mark.timeout(20)
@needs("capacity")
@pytest.mark.parametrize("kind", ["normal", "specific"])
async def test_send_to_channel_at_capacity_raises_channel_full(backend, kind):
    layer = backend.make(capacity=3)
    channel = "conformance.full" if kind == "normal" else await layer.new_channel()
    for n in range(3):
        await layer.send(channel, {"type": "test.fill", "n": n})
    with pytest.raises(ChannelFull):
        await layer.send(channel, {"type": "test.fill", "n": 3})
    received = await recv_many(layer, channel, 3)
    assert [message["n"] for message in received] == [0, 1, 2]
    await assert_no_message(layer, channel)


@pytest.mark.timeout(20)
@needs("capacity")
async def test_receiving_frees_capacity(backend):
    layer = backend.make(capacity=1)
    await layer.send("conformance.one", {"type": "test.first"})
    with pytest.raises(ChannelFull):
        await layer.send("conformance.one", {"type": "test.second"})
    assert await recv(layer, "conformance.one") == {"type": "test.first"}
    await layer.send("conformance.one", {"type": "test.third"})
    assert await recv(layer, "conformance.one") == {"type": "test.third"}


@pytest.mark.timeout(20)
@needs("capacity")
async def test_capacity_counts_per_channel_name(backend):
    """A full channel never blocks its siblings.

    RedisChannelLayer counts all specific channels of one layer instance
    together (they share one Redis list), so there a full specific channel
    does block the other specific channels of the same process; normal
    channels are counted one by one everywhere.
    """
    layer = backend.make(capacity=2)
    first, second = await layer.new_channel(), await layer.new_channel()
    for n in range(2):
        await layer.send(first, {"type": "test.fill", "n": n})
        await layer.send("conformance.busy", {"type": "test.fill", "n": n})
    with pytest.raises(ChannelFull):
        await layer.send(first, {"type": "test.overflow"})
    # Normal channels: one full channel leaves another untouched.
    await layer.send("conformance.idle", {"type": "test.other"})
    assert await recv(layer, "conformance.idle") == {"type": "test.other"}
    # Specific channels of one process.
    if backend.name == "redis":
        with pytest.raises(ChannelFull):
            await layer.send(second, {"type": "test.sibling"})
    else:
        await layer.send(second, {"type": "test.sibling"})
        assert await recv(layer, second) == {"type": "test.sibling"}


@pytest.mark.timeout(20)
@needs("capacity")
@xfail_backend("inmemory", UNCOMPILED_PATTERNS, raises=(ValueError, TypeError))
async def test_channel_capacity_glob_and_regex_patterns(backend):
    layer = backend.make(
        capacity=4,
        channel_capacity={
            "tiny.*": 1,
            re.compile(r"^medium-\d+$"): 2,
        },
    )
    expected = {"tiny.glob": 1, "medium-42": 2, "medium-x": 4, "other": 4}
    for channel, capacity in expected.items():
        for n in range(capacity):
            await layer.send(channel, {"type": "test.fill", "n": n})
        with pytest.raises(ChannelFull):
            await layer.send(channel, {"type": "test.overflow"})
        received = await recv_many(layer, channel, capacity)
        assert [m["n"] for m in received] == list(range(capacity)), channel


@pytest.mark.timeout(20)
@needs("capacity")
@xfail_backend("inmemory", UNCOMPILED_PATTERNS, raises=(ValueError, TypeError))
async def test_channel_capacity_pattern_matches_full_specific_name(backend):
    layer = backend.make(capacity=1, channel_capacity={"roomy.*!*": 5})
    roomy = await layer.new_channel(prefix="roomy")
    for n in range(5):
        await layer.send(roomy, {"type": "test.fill", "n": n})
    with pytest.raises(ChannelFull):
        await layer.send(roomy, {"type": "test.overflow"})
    received = await recv_many(layer, roomy, 5)
    assert [m["n"] for m in received] == list(range(5))


@pytest.mark.timeout(20)
@needs("capacity", "foreign_members")
async def test_group_send_skips_full_member_and_delivers_to_others(backend):
    layer = backend.make(capacity=1)
    await layer.group_add("room", "conformance.member-full")
    await layer.group_add("room", "conformance.member-free")
    await layer.send("conformance.member-full", {"type": "test.first"})
    await layer.group_send("room", {"type": "test.group"})  # must not raise
    assert await recv(layer, "conformance.member-free") == {"type": "test.group"}
    assert await recv(layer, "conformance.member-full") == {"type": "test.first"}
    await assert_no_message(layer, "conformance.member-full")
    # Once there is room again, the member receives group messages again.
    await layer.group_send("room", {"type": "test.again"})
    assert await recv(layer, "conformance.member-full") == {"type": "test.again"}
    assert await recv(layer, "conformance.member-free") == {"type": "test.again"}
