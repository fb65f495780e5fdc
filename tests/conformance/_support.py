"""Shared pieces of the conformance suite: backend limitations, markers and
receive helpers with timeouts."""

import asyncio

import pytest

# What a backend cannot do, and why. Keys are the features named by
# `needs` and `Backend.require`.
LIMITATIONS = {
    "redis_pubsub": {
        "capacity": "RedisPubSubChannelLayer has no capacity: publishing never "
        "raises ChannelFull",
        "expiry": "RedisPubSubChannelLayer stores no messages, so nothing expires",
        "group_expiry": "RedisPubSubChannelLayer group memberships are local "
        "subscriptions without group_expiry",
        "validation": "RedisPubSubChannelLayer validates neither names nor messages",
        "stored_messages": "RedisPubSubChannelLayer drops a message sent to a "
        "channel nobody is subscribed to yet",
        "single_delivery": "RedisPubSubChannelLayer publishes every message to "
        "every subscriber of the channel",
        "cancel_safe": "RedisPubSubChannelLayer unsubscribes a cancelled "
        "receive(); what is published meanwhile is lost",
        "foreign_members": "RedisPubSubChannelLayer group_add() accepts only "
        "channels this instance subscribed to in this event loop",
        "specific_names": "RedisPubSubChannelLayer new_channel() names have "
        "no '!' part",
        "shared_flush": "RedisPubSubChannelLayer flush() clears only this "
        "instance's local subscriptions",
        "option_check": "RedisPubSubChannelLayer passes unknown options on "
        "and ignores them",
        "loop_independent": "RedisPubSubChannelLayer subscriptions belong to "
        "one event loop and end with it",
        "message_size_limit": "RedisPubSubChannelLayer has no per-message size limit",
    },
    "redis": {
        "message_size_limit": "RedisChannelLayer has no per-message size limit "
        "(Redis takes values up to 512 MB)",
    },
    "inmemory": {
        "shared_state": "InMemoryChannelLayer instances share nothing with each other",
        "processes": "InMemoryChannelLayer lives in one process; no other "
        "process can reach it",
        "serialization": "InMemoryChannelLayer deep-copies messages instead of "
        "serializing them, so any Python value passes",
        "redis_config": "InMemoryChannelLayer takes no hosts or "
        "symmetric_encryption_keys option",
        "message_size_limit": "InMemoryChannelLayer has no per-message size limit",
    },
    "dmb": {},
}


def needs(*features):
    """Skip every backend that lacks one of `features`, with its reason."""
    return pytest.mark.needs(*features)


def xfail_backend(name, reason, raises=None, strict=True):
    """An expected failure for backend `name` only; strict unless the
    failure depends on timing."""
    return pytest.mark.xfail_backend(name, reason=reason, raises=raises, strict=strict)


async def recv(layer, channel, timeout=2.0):
    """receive(), but fail the test instead of waiting forever."""
    return await asyncio.wait_for(layer.receive(channel), timeout)


async def recv_many(layer, channel, count, timeout=5.0):
    async def collect():
        return [await layer.receive(channel) for _ in range(count)]

    return await asyncio.wait_for(collect(), timeout)


async def assert_no_message(layer, channel, wait=0.3):
    """Nothing arrives on `channel` within `wait` seconds."""
    try:
        message = await asyncio.wait_for(layer.receive(channel), wait)
    except asyncio.TimeoutError:
        return
    raise AssertionError(f"unexpected message on {channel!r}: {message!r}")
