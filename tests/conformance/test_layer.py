"""The layer as a whole: extensions, flush and configuration."""

import pytest
from channels.layers import ChannelLayerManager

from ._support import assert_no_message, needs, recv

pytestmark = pytest.mark.asyncio


@pytest.mark.timeout(20)
async def test_extensions_include_groups_and_flush(backend):
    layer = backend.make()
    assert "groups" in layer.extensions
    assert "flush" in layer.extensions


@pytest.mark.timeout(20)
async def test_flush_removes_messages_and_groups(backend):
    layer = backend.make()
    specific = await layer.new_channel()
    await layer.group_add("flushed", specific)
    await layer.send(specific, {"type": "test.before"})
    if not backend.lacks("stored_messages"):
        await layer.send("conformance.normal", {"type": "test.before"})
    await layer.flush()
    await assert_no_message(layer, specific)
    await assert_no_message(layer, "conformance.normal")
    await layer.group_send("flushed", {"type": "test.after"})
    await assert_no_message(layer, specific)
    # The layer goes on working after a flush.
    fresh = await layer.new_channel()
    await layer.group_add("flushed", fresh)
    await layer.group_send("flushed", {"type": "test.after"})
    assert await recv(layer, fresh) == {"type": "test.after"}


@pytest.mark.timeout(20)
@needs("shared_state", "shared_flush", "stored_messages")
async def test_flush_is_seen_by_every_instance(backend):
    first, second = backend.make(), backend.make()
    await first.send("conformance.normal", {"type": "test.before"})
    await first.group_add("flushed", "conformance.member")
    await second.flush()
    await assert_no_message(first, "conformance.normal")
    await first.group_send("flushed", {"type": "test.after"})
    await assert_no_message(first, "conformance.member")


@pytest.mark.timeout(20)
@needs("redis_config")
async def test_channels_redis_config_is_accepted(backend):
    """A CONFIG written for channels_redis works once BACKEND is changed."""
    if backend.name in ("redis", "redis_pubsub"):
        pytest.importorskip(
            "cryptography", reason="channels_redis encrypts only with cryptography"
        )
    layer = backend.make(
        hosts=backend.hosts,
        symmetric_encryption_keys=["a-secret-key"],
        expiry=60,
        group_expiry=86400,
        capacity=100,
        channel_capacity={"http.request": 200, "websocket.send*": 20},
    )
    channel = await layer.new_channel()
    await layer.group_add("configured", channel)
    await layer.group_send("configured", {"type": "test.configured"})
    assert await recv(layer, channel) == {"type": "test.configured"}


@pytest.mark.timeout(20)
@needs("option_check")
async def test_unknown_option_is_rejected_naming_it(backend):
    with pytest.raises((TypeError, ValueError), match="bogus_option"):
        backend.make(bogus_option=1)


@pytest.mark.timeout(20)
async def test_backend_path_and_config_build_the_layer_through_channels(backend):
    """What Django Channels does with a CHANNEL_LAYERS entry: import the
    BACKEND path and call it with CONFIG."""

    class Manager(ChannelLayerManager):
        configs = {"default": {"BACKEND": backend.path, "CONFIG": backend.config()}}

    layer = backend.adopt(Manager()["default"])
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "test.configured"})
    assert await recv(layer, channel) == {"type": "test.configured"}
