"""BR-09: invalid names give clear errors everywhere; receiving on another
process's channel fails at once."""

import asyncio
import time

import pytest

from .support import br09_owner, segment_counts

pytestmark = pytest.mark.asyncio

MSG = {"type": "t"}
GOOD_GROUP = "valid-group"
GOOD_CHANNEL = "valid.channel"
TOO_LONG = ["a" * 100, "a" * 118]
BAD_CHARS = ["room 1", "room/1", "caf\u00e9", "=+135!", ""]
WRONG_TYPES = [b"room", None, 42]


def calls_with_group(layer, group):
    return {
        "group_add": lambda: layer.group_add(group, GOOD_CHANNEL),
        "group_discard": lambda: layer.group_discard(group, GOOD_CHANNEL),
        "group_send": lambda: layer.group_send(group, MSG),
    }


def calls_with_channel(layer, channel):
    return {
        "send": lambda: layer.send(channel, MSG),
        "receive": lambda: layer.receive(channel),
        "group_add": lambda: layer.group_add(GOOD_GROUP, channel),
        "group_discard": lambda: layer.group_discard(GOOD_GROUP, channel),
    }


async def refused(call):
    """The TypeError a call raises at once (a receive gets 1 s, no more)."""
    with pytest.raises(TypeError) as caught:
        await asyncio.wait_for(call(), 1.0)
    return str(caught.value)


def says_allowed_characters(text):
    text = text.lower()
    return all(word in text for word in ("ascii", "hyphen", "underscore", "period"))


@pytest.mark.timeout(60)
async def test_br09_names_at_and_past_the_limit(make_layer):
    layer = make_layer()
    edge = "a" * 99
    await layer.group_add(edge, edge)
    await layer.group_send(edge, {"type": "t", "via": "group"})
    await layer.send(edge, {"type": "t", "via": "send"})
    assert await asyncio.wait_for(layer.receive(edge), 1) == {
        "type": "t",
        "via": "group",
    }
    assert await asyncio.wait_for(layer.receive(edge), 1) == {
        "type": "t",
        "via": "send",
    }
    await layer.group_discard(edge, edge)

    before = segment_counts(layer)
    for name in TOO_LONG:
        calls = {
            **{f"group {k}": v for k, v in calls_with_group(layer, name).items()},
            **{f"channel {k}": v for k, v in calls_with_channel(layer, name).items()},
        }
        for label, call in calls.items():
            text = await refused(call)
            assert "100" in text, (label, len(name), text)
    assert segment_counts(layer) == before


@pytest.mark.timeout(60)
async def test_br09_bad_characters_and_wrong_types(make_layer):
    layer = make_layer()
    before = segment_counts(layer)
    for name in BAD_CHARS + ["a!b"]:
        for label, call in calls_with_group(layer, name).items():
            text = await refused(call)
            assert says_allowed_characters(text), (label, name, text)
    for name in BAD_CHARS:
        for label, call in calls_with_channel(layer, name).items():
            text = await refused(call)
            assert says_allowed_characters(text), (label, name, text)
    # A new_channel prefix becomes part of a name, so the same rule holds.
    # ("" is left out: channels_redis accepts it, making ".<client>!<id>".)
    for name in BAD_CHARS[:-1]:
        text = await refused(lambda name=name: layer.new_channel(prefix=name))
        assert says_allowed_characters(text), (name, text)
    for name in WRONG_TYPES:
        calls = {
            **{f"group {k}": v for k, v in calls_with_group(layer, name).items()},
            **{f"channel {k}": v for k, v in calls_with_channel(layer, name).items()},
        }
        for label, call in calls.items():
            await refused(call)  # TypeError, not AttributeError or assert
    assert segment_counts(layer) == before

    # The failures left nothing behind: normal use works.
    member = await layer.new_channel()
    await layer.group_add(GOOD_GROUP, member)
    await layer.group_send(GOOD_GROUP, {"type": "t", "n": 1})
    assert await asyncio.wait_for(layer.receive(member), 1) == {"type": "t", "n": 1}
    await layer.send(GOOD_CHANNEL, {"type": "t", "n": 2})
    assert await asyncio.wait_for(layer.receive(GOOD_CHANNEL), 1) == {
        "type": "t",
        "n": 2,
    }


@pytest.mark.timeout(60)
async def test_br09_receive_on_another_process_channel_fails_fast(
    make_layer, prefix, children
):
    layer = make_layer()  # process B
    owner = children.start(br09_owner, prefix, {}, name="A")
    channel = await owner.expect("channel")
    started = time.monotonic()
    with pytest.raises((TypeError, ValueError, AssertionError)) as caught:
        await asyncio.wait_for(layer.receive(channel), 1.0)
    assert time.monotonic() - started < 1.0
    assert "another process" in str(caught.value), caught.value
    # A still owns it and gets what is sent to it.
    await layer.send(channel, {"type": "t", "for": "A"})
    assert await owner.expect("got") == {"type": "t", "for": "A"}
    await owner.expect("result")
    await children.join([owner], timeout=10)

    # Step 6: the refusal left nothing behind here either.
    member = await layer.new_channel()
    await layer.group_add(GOOD_GROUP, member)
    await layer.group_send(GOOD_GROUP, {"type": "t", "n": 1})
    assert await asyncio.wait_for(layer.receive(member), 1) == {"type": "t", "n": 1}
    await layer.send(GOOD_CHANNEL, {"type": "t", "n": 2})
    assert await asyncio.wait_for(layer.receive(GOOD_CHANNEL), 1) == {
        "type": "t",
        "n": 2,
    }
