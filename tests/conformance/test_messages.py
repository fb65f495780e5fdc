"""send() and receive(): delivery, order, message contents and validation."""

import asyncio
import copy

import pytest

from ._support import assert_no_message, needs, recv, recv_many

pytestmark = pytest.mark.asyncio


async def channel_of_kind(backend, layer, kind):
    """A normal channel name, or a specific one made by `layer`."""
    if kind == "normal":
        backend.require("stored_messages")
        return "conformance.normal"
    return await layer.new_channel()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["normal", "specific"])
async def test_send_then_receive_returns_equal_message(backend, kind):
    layer = backend.make()
    channel = await channel_of_kind(backend, layer, kind)
    message = {"type": "test.message", "text": "Ahoy-hoy!", "number": 7}
    await layer.send(channel, message)
    assert await recv(layer, channel) == message
    await assert_no_message(layer, channel)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["normal", "specific"])
async def test_receive_waits_for_a_later_send(backend, kind):
    layer = backend.make()
    channel = "conformance.later" if kind == "normal" else await layer.new_channel()
    waiting = asyncio.ensure_future(recv(layer, channel, timeout=5))
    await asyncio.sleep(0.2)
    assert not waiting.done(), "receive() returned before anything was sent"
    await layer.send(channel, {"type": "test.late", "n": 1})
    assert await asyncio.wait_for(waiting, 5) == {"type": "test.late", "n": 1}


@pytest.mark.timeout(20)
async def test_messages_arrive_in_send_order(backend):
    layer = backend.make()
    channels = [await layer.new_channel(), await layer.new_channel()]
    if not backend.lacks("stored_messages"):
        channels.append("conformance.ordered")
    count = 40
    for n in range(count):
        for channel in channels:
            await layer.send(channel, {"type": "test.seq", "n": n})
    for channel in channels:
        received = await recv_many(layer, channel, count)
        assert [message["n"] for message in received] == list(range(count))


@pytest.mark.timeout(20)
async def test_message_values_round_trip_unchanged(backend):
    layer = backend.make()
    channel = await layer.new_channel()
    message = {
        "type": "test.values",
        "text": "h\u00e9llo \u2713 \u4e16\u754c",
        "empty": "",
        "bytes": b"\x00\xff binary \x7f",
        "int": 2**62,
        "negative": -17,
        "float": 1.5,
        "true": True,
        "false": False,
        "none": None,
        "list": [1, "two", [3.0, None]],
        "dict": {"nested": {"deeper": [], "n": 0}},
    }
    await layer.send(channel, message)
    assert await recv(layer, channel) == message


@pytest.mark.timeout(20)
async def test_large_message_round_trips(backend):
    layer = backend.make()
    channel = await layer.new_channel()
    blob = bytes(range(256)) * 1024  # 256 KiB
    await layer.send(channel, {"type": "test.large", "blob": blob})
    received = await recv(layer, channel, timeout=5)
    assert received["blob"] == blob


@pytest.mark.timeout(20)
async def test_caller_message_not_mutated(backend):
    layer = backend.make()
    channel = await layer.new_channel()
    await layer.group_add("watchers", channel)
    message = {"type": "test.shared", "nested": {"items": [1, 2]}}
    snapshot = copy.deepcopy(message)
    await layer.send(channel, message)
    await layer.group_send("watchers", message)
    assert message == snapshot, "the layer changed the caller's message"
    # Changing the message after send() does not change what is delivered.
    message["type"] = "test.changed"
    message["nested"]["items"].append(3)
    assert await recv(layer, channel) == snapshot
    assert await recv(layer, channel) == snapshot


@pytest.mark.timeout(20)
@needs("serialization")
async def test_unserializable_value_raises_type_error_at_send(backend):
    layer = backend.make()
    channel = await layer.new_channel()
    await layer.group_add("group", channel)
    bad = {"type": "test.bad", "when": object()}
    with pytest.raises(TypeError) as raised:
        await layer.send(channel, bad)
    if backend.name == "dmb":
        assert "when" in str(raised.value), "the error should name the key"
    with pytest.raises(TypeError):
        await layer.group_send("group", bad)
    await assert_no_message(layer, channel)
    # The layer is still usable afterwards.
    fresh = await layer.new_channel()
    await layer.send(fresh, {"type": "test.good"})
    assert await recv(layer, fresh) == {"type": "test.good"}


@pytest.mark.timeout(20)
async def test_message_with_non_str_key_is_refused_at_send_by_dmb(backend):
    """dmb refuses a non-str key at send(), before anything is written.

    The other backends accept the send: the msgpack ones then fail in
    receive() (msgpack refuses non-str map keys by default when unpacking)
    and InMemoryChannelLayer delivers the key unchanged.
    """
    layer = backend.make()
    channel = await layer.new_channel()
    message = {"type": "test.keys", 1: "one"}
    if backend.name == "dmb":
        with pytest.raises(TypeError):
            await layer.send(channel, message)
        await assert_no_message(layer, channel)
    elif backend.name in ("redis", "redis_pubsub"):
        await layer.send(channel, message)
        with pytest.raises(ValueError):
            await recv(layer, channel)
    else:
        await layer.send(channel, message)
        assert await recv(layer, channel) == message


@pytest.mark.timeout(20)
@needs("validation")
async def test_message_that_is_not_a_dict_is_refused(backend):
    layer = backend.make()
    channel = await layer.new_channel()
    with pytest.raises(AssertionError):
        await layer.send(channel, ["not", "a", "dict"])
    await assert_no_message(layer, channel)


@pytest.mark.timeout(20)
@needs("validation")
async def test_reserved_asgi_channel_key_is_refused(backend):
    layer = backend.make()
    channel = await layer.new_channel()
    with pytest.raises(AssertionError):
        await layer.send(channel, {"type": "test.x", "__asgi_channel__": channel})
    await assert_no_message(layer, channel)


@pytest.mark.timeout(20)
@needs("message_size_limit")
async def test_message_over_max_message_size_is_refused_at_send(backend):
    layer = backend.make(max_message_size=4096)
    channel = await layer.new_channel()
    await layer.group_add("big", channel)
    with pytest.raises(backend.dmb.MessageTooLarge, match="max_message_size"):
        await layer.send(channel, {"type": "test.big", "blob": b"x" * 8192})
    with pytest.raises(backend.dmb.MessageTooLarge):
        await layer.group_send("big", {"type": "test.big", "blob": b"x" * 8192})
    await assert_no_message(layer, channel)
    await layer.send(channel, {"type": "test.small", "blob": b"x" * 1024})
    assert (await recv(layer, channel))["type"] == "test.small"


@pytest.mark.timeout(20)
async def test_two_receivers_on_one_channel_each_get_one_message(backend):
    layer = backend.make()
    channel = "conformance.shared"
    receivers = [asyncio.ensure_future(recv(layer, channel, 5)) for _ in range(2)]
    await asyncio.sleep(0.2)
    await layer.send(channel, {"type": "test.n", "n": 1})
    await layer.send(channel, {"type": "test.n", "n": 2})
    received = await asyncio.wait_for(asyncio.gather(*receivers), 5)
    assert sorted(message["n"] for message in received) == [1, 2]


@pytest.mark.timeout(20)
async def test_concurrent_receives_on_specific_channels_get_their_own(backend):
    layer = backend.make()
    channels = [await layer.new_channel() for _ in range(8)]
    receivers = [asyncio.ensure_future(recv(layer, c, 5)) for c in channels]
    await asyncio.sleep(0.2)
    for index, channel in reversed(list(enumerate(channels))):
        await layer.send(channel, {"type": "test.own", "index": index})
    received = await asyncio.wait_for(asyncio.gather(*receivers), 5)
    assert [message["index"] for message in received] == list(range(8))


@pytest.mark.timeout(20)
@needs("shared_state")
async def test_normal_channel_is_shared_between_layer_instances(backend):
    sender, receiver = backend.make(), backend.make()
    waiting = asyncio.ensure_future(recv(receiver, "conformance.between", 5))
    await asyncio.sleep(0.2)  # lets a subscribing backend subscribe first
    await sender.send("conformance.between", {"type": "test.between"})
    assert await asyncio.wait_for(waiting, 5) == {"type": "test.between"}
