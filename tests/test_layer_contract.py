"""The Channels layer contract as dmb keeps it, in one process.

Each test builds layers on its own segment (``make_layer``).  Waits are
bounded by deadlines; nothing here asserts how fast anything is.  Where a
test must show that something did *not* arrive, it sends a sentinel after
it and checks that the sentinel comes first, instead of waiting for
silence.
"""

import asyncio
import copy
import datetime
import decimal
import inspect
import logging
import os
import random
import re

import pytest
from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer
from dmb_tools import identity_holds, stats, wait_until_async, waiting_on

from dmb import ForeignChannel, MessageTooLarge

pytestmark = pytest.mark.timeout(30)

#: How long a receive that must succeed may take before the test fails.
DEADLINE = 5


async def receive(layer, channel, timeout=DEADLINE):
    return await asyncio.wait_for(layer.receive(channel), timeout)


async def wait_registered(layer, *channels):
    await wait_until_async(
        lambda: waiting_on(layer.segment_name, channels, os.getpid()),
        DEADLINE,
        f"receives on {channels} to wait",
    )


async def next_is_sentinel(layer, channel):
    """Send a sentinel and show it is the next (so only) thing queued."""
    await layer.send(channel, {"type": "sentinel"})
    assert await receive(layer, channel) == {"type": "sentinel"}


# API and extensions.


def test_extensions_are_groups_and_flush(make_layer):
    layer = make_layer()
    assert "groups" in layer.extensions
    assert "flush" in layer.extensions
    assert isinstance(layer, BaseChannelLayer)


@pytest.mark.parametrize(
    "method",
    [
        "new_channel",
        "send",
        "receive",
        "group_add",
        "group_discard",
        "group_send",
        "flush",
        "close",
    ],
)
def test_api_method_is_a_coroutine_function(make_layer, method):
    assert inspect.iscoroutinefunction(getattr(make_layer(), method))


async def test_new_channel_names_are_process_specific_and_valid(make_layer):
    layer = make_layer()
    names = {await layer.new_channel() for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert name.startswith("specific.")
        assert "!" in name
        assert layer.require_valid_channel_name(name)
    custom = await layer.new_channel(prefix="websocket")
    assert custom.startswith("websocket.") and "!" in custom


BAD_CHANNELS = ["", "a" * 100, "has space", "slash/name", "two!bang!s", 5, None, b"x"]
BAD_GROUPS = ["", "g" * 100, "has space", "bang!", 7, None, b"g"]


def base_error(check, name):
    """The exception BaseChannelLayer's own validation raises for ``name``."""
    try:
        check(name)
    except Exception as exc:
        return type(exc)
    return None


@pytest.mark.parametrize("name", BAD_CHANNELS, ids=repr)
async def test_channel_name_validation_matches_base_channel_layer(make_layer, name):
    layer = make_layer()
    expected = base_error(BaseChannelLayer().require_valid_channel_name, name)
    assert expected is TypeError
    with pytest.raises(expected):
        await layer.send(name, {"type": "x"})
    with pytest.raises(expected):
        await layer.receive(name)
    with pytest.raises(expected):
        await layer.group_add("group", name)
    with pytest.raises(expected):
        await layer.group_discard("group", name)
    assert stats(layer.segment_name)["used_channels"] == 0


@pytest.mark.parametrize("name", BAD_GROUPS, ids=repr)
async def test_group_name_validation_matches_base_channel_layer(make_layer, name):
    layer = make_layer()
    expected = base_error(BaseChannelLayer().require_valid_group_name, name)
    assert expected is TypeError
    with pytest.raises(expected):
        await layer.group_add(name, "channel")
    with pytest.raises(expected):
        await layer.group_discard(name, "channel")
    with pytest.raises(expected):
        await layer.group_send(name, {"type": "x"})


# Order.


async def test_messages_on_a_channel_arrive_in_send_order(make_layer):
    layer = make_layer(capacity=1000)
    for i in range(500):
        await layer.send("order.one", {"type": "m", "i": i})
    got = [(await receive(layer, "order.one"))["i"] for _ in range(500)]
    assert got == list(range(500))


async def test_order_holds_per_channel_with_interleaved_channels(make_layer):
    layer = make_layer(capacity=1000)
    specific = await layer.new_channel()
    names = ["order.a", "order.b", specific]
    for i in range(300):
        await layer.send(names[i % 3], {"type": "m", "i": i})
    for k, name in enumerate(reversed(names)):
        got = [(await receive(layer, name))["i"] for _ in range(100)]
        assert got == list(range(2 - k, 300, 3))


async def test_order_holds_for_sends_and_group_sends_mixed(make_layer):
    layer = make_layer(capacity=1000)
    channel = await layer.new_channel()
    await layer.group_add("mixed", channel)
    for i in range(200):
        if i % 2:
            await layer.group_send("mixed", {"type": "m", "i": i})
        else:
            await layer.send(channel, {"type": "m", "i": i})
    got = [(await receive(layer, channel))["i"] for _ in range(200)]
    assert got == list(range(200))


async def test_waiting_receive_gets_a_message_sent_later(make_layer):
    layer = make_layer()
    task = asyncio.ensure_future(layer.receive("later.one"))
    await wait_registered(layer, "later.one")
    await layer.send("later.one", {"type": "late"})
    assert await asyncio.wait_for(task, DEADLINE) == {"type": "late"}


# Groups.


async def test_group_discard_stops_delivery_and_tolerates_non_members(make_layer):
    layer = make_layer()
    stays, leaves = await layer.new_channel(), await layer.new_channel()
    for channel in (stays, leaves):
        await layer.group_add("club", channel)
    await layer.group_discard("club", leaves)
    await layer.group_discard("club", leaves)  # again: no error
    await layer.group_discard("club", "never.joined")
    await layer.group_discard("no-such-group", stays)
    await layer.group_send("club", {"type": "news"})
    assert await receive(layer, stays) == {"type": "news"}
    await next_is_sentinel(layer, leaves)


async def test_group_send_to_an_empty_or_unknown_group_is_fine(make_layer):
    layer = make_layer()
    await layer.group_send("nobody-here", {"type": "m"})
    channel = await layer.new_channel()
    await layer.group_add("emptied", channel)
    await layer.group_discard("emptied", channel)
    await layer.group_send("emptied", {"type": "m"})
    counts = stats(layer.segment_name)
    assert counts["sent"] == 0 and counts["queued"] == 0


async def test_group_add_twice_delivers_once(make_layer):
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.group_add("twice", channel)
    await layer.group_add("twice", channel)
    await layer.group_send("twice", {"type": "once"})
    assert await receive(layer, channel) == {"type": "once"}
    await next_is_sentinel(layer, channel)


# Capacity.


async def test_send_at_capacity_raises_channel_full(make_layer):
    layer = make_layer(capacity=3)
    for i in range(3):
        await layer.send("full.one", {"type": "m", "i": i})
    with pytest.raises(ChannelFull):
        await layer.send("full.one", {"type": "m", "i": 3})
    assert stats(layer.segment_name)["queued"] == 3
    assert (await receive(layer, "full.one"))["i"] == 0
    await layer.send("full.one", {"type": "m", "i": 4})
    got = [(await receive(layer, "full.one"))["i"] for _ in range(3)]
    assert got == [1, 2, 4]


async def test_capacity_counts_per_channel_by_full_name(make_layer):
    """A full channel never blocks its siblings of the same process."""
    layer = make_layer(capacity=2)
    busy = await layer.new_channel()
    sibling = await layer.new_channel()
    assert busy.split("!")[0] == sibling.split("!")[0]
    for i in range(2):
        await layer.send(busy, {"type": "m", "i": i})
    with pytest.raises(ChannelFull):
        await layer.send(busy, {"type": "m"})
    for i in range(2):
        await layer.send(sibling, {"type": "m", "i": i})
    with pytest.raises(ChannelFull):
        await layer.send(sibling, {"type": "m"})
    for i in range(2):
        await layer.send("plain.sibling", {"type": "m", "i": i})
    assert stats(layer.segment_name)["queued"] == 6


async def test_capacity_is_shared_by_every_sender_of_a_channel(make_layer):
    first = make_layer(capacity=2)
    second = make_layer(capacity=2)
    await first.send("shared.queue", {"type": "m", "i": 0})
    await second.send("shared.queue", {"type": "m", "i": 1})
    with pytest.raises(ChannelFull):
        await first.send("shared.queue", {"type": "m", "i": 2})
    with pytest.raises(ChannelFull):
        await second.send("shared.queue", {"type": "m", "i": 2})


async def test_channel_capacity_patterns_are_compiled(make_layer):
    """InMemoryChannelLayer stores the patterns raw and every send fails."""
    layer = make_layer(channel_capacity={"http.*": 2, re.compile(r"^ws\."): 3})
    assert all(hasattr(pattern, "match") for pattern, _ in layer.channel_capacity)
    await layer.send("http.request", {"type": "m"})
    await layer.send("unmatched.channel", {"type": "m"})
    assert layer.get_capacity("http.request") == 2
    assert layer.get_capacity("ws.connect") == 3
    assert layer.get_capacity("unmatched.channel") == 100


async def test_channel_capacity_glob_matches_the_full_name(make_layer):
    layer = make_layer(capacity=5, channel_capacity={"http.*": 2, "sp.*!*slow": 1})
    for _ in range(2):
        await layer.send("http.request", {"type": "m"})
    with pytest.raises(ChannelFull):
        await layer.send("http.request", {"type": "m"})
    for _ in range(5):
        await layer.send("http", {"type": "m"})  # "http.*" needs the dot
    specific = await layer.new_channel("sp")
    slow = specific + "slow"
    await layer.send(slow, {"type": "m"})
    with pytest.raises(ChannelFull):
        await layer.send(slow, {"type": "m"})
    for _ in range(5):
        await layer.send(specific, {"type": "m"})
    with pytest.raises(ChannelFull):
        await layer.send(specific, {"type": "m"})


async def test_channel_capacity_regex_matches_the_full_name(make_layer):
    layer = make_layer(
        capacity=4,
        channel_capacity={re.compile(r"^ws\.\d+$"): 1, re.compile(r".*!vip$"): 2},
    )
    await layer.send("ws.12", {"type": "m"})
    with pytest.raises(ChannelFull):
        await layer.send("ws.12", {"type": "m"})
    for _ in range(4):
        await layer.send("ws.12x", {"type": "m"})
    vip = (await layer.new_channel()).split("!")[0] + "!vip"
    for _ in range(2):
        await layer.send(vip, {"type": "m"})
    with pytest.raises(ChannelFull):
        await layer.send(vip, {"type": "m"})


async def test_group_send_skips_full_members_and_logs_at_info(make_layer, caplog):
    layer = make_layer(capacity=10, channel_capacity={"*!tiny": 1})
    base = (await layer.new_channel()).split("!")[0]
    full, roomy = base + "!tiny", base + "!roomy"
    await layer.group_add("crowd", full)
    await layer.group_add("crowd", roomy)
    await layer.send(full, {"type": "first"})
    before = stats(layer.segment_name)
    with caplog.at_level(logging.INFO, logger="dmb"):
        await layer.group_send("crowd", {"type": "news"})
    after = stats(layer.segment_name)
    assert await receive(layer, roomy) == {"type": "news"}
    assert await receive(layer, full) == {"type": "first"}
    await next_is_sentinel(layer, full)
    assert after["dropped_full"] == before["dropped_full"] + 1
    skipped = [
        r
        for r in caplog.records
        if r.levelno == logging.INFO and "crowd" in r.getMessage()
    ]
    assert skipped, "no INFO record names the group whose member was skipped"
    assert identity_holds(stats(layer.segment_name))


# Expiry.


async def test_message_older_than_expiry_is_never_delivered(make_layer):
    layer = make_layer(expiry=1)
    specific = await layer.new_channel()
    for name in ("old.normal", specific):
        await layer.send(name, {"type": "old"})
    await asyncio.sleep(1.5)
    for name in ("old.normal", specific):
        await layer.send(name, {"type": "young"})
        assert await receive(layer, name) == {"type": "young"}
    counts = stats(layer.segment_name)
    assert counts["expired"] == 2
    assert counts["queued"] == 0
    assert identity_holds(counts)


async def test_group_sent_message_older_than_expiry_is_never_delivered(make_layer):
    layer = make_layer(expiry=1)
    channel = await layer.new_channel()
    await layer.group_add("old-news", channel)
    await layer.group_send("old-news", {"type": "old"})
    await asyncio.sleep(1.5)
    await next_is_sentinel(layer, channel)
    assert stats(layer.segment_name)["expired"] == 1


async def test_expired_message_does_not_count_towards_capacity(make_layer):
    layer = make_layer(expiry=1, capacity=1)
    await layer.send("cap.expiry", {"type": "old"})
    await asyncio.sleep(1.5)
    await layer.send("cap.expiry", {"type": "young"})
    assert await receive(layer, "cap.expiry") == {"type": "young"}


async def test_membership_older_than_group_expiry_no_longer_receives(make_layer):
    layer = make_layer(group_expiry=1)
    channel = await layer.new_channel()
    await layer.group_add("short", channel)
    await layer.group_send("short", {"type": "while.member"})
    assert await receive(layer, channel) == {"type": "while.member"}
    await asyncio.sleep(1.5)
    await layer.group_send("short", {"type": "after.expiry"})
    await next_is_sentinel(layer, channel)
    assert stats(layer.segment_name)["used_members"] == 0


async def test_group_add_again_refreshes_the_membership(make_layer):
    layer = make_layer(group_expiry=2)
    channel = await layer.new_channel()
    await layer.group_add("renewed", channel)
    await asyncio.sleep(1.2)
    await layer.group_add("renewed", channel)
    await asyncio.sleep(1.2)  # 2.4 s after joining, 1.2 s after renewing
    await layer.group_send("renewed", {"type": "still.member"})
    assert await receive(layer, channel) == {"type": "still.member"}


# Process-specific channels.


async def test_receive_on_another_layers_specific_channel_fails_at_once(make_layer):
    owner = make_layer()
    other = make_layer()
    channel = await owner.new_channel()
    await owner.send(channel, {"type": "for.owner"})
    with pytest.raises(ForeignChannel) as caught:
        await asyncio.wait_for(other.receive(channel), DEADLINE)
    assert isinstance(caught.value, ValueError)
    assert channel in str(caught.value)
    assert "another process" in str(caught.value)
    assert await receive(owner, channel) == {"type": "for.owner"}


async def test_specific_channel_takes_sends_from_any_layer(make_layer):
    owner = make_layer()
    other = make_layer()
    channel = await owner.new_channel()
    await other.send(channel, {"type": "hello"})
    assert await receive(owner, channel) == {"type": "hello"}


async def test_normal_channel_message_goes_to_exactly_one_receiver(make_layer):
    layers = [make_layer() for _ in range(3)]
    tasks = [asyncio.ensure_future(layer.receive("one.of.them")) for layer in layers]
    tasks += [asyncio.ensure_future(layers[0].receive("one.of.them"))]
    await wait_registered(layers[1], "one.of.them")
    for i in range(4):
        await layers[i % 3].send("one.of.them", {"type": "m", "i": i})
    done = await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)
    assert sorted(m["i"] for m in done) == [0, 1, 2, 3]
    assert stats(layers[0].segment_name)["queued"] == 0


# Cancellation.


async def test_cancelled_waiting_receive_loses_nothing(make_layer):
    layer = make_layer()
    task = asyncio.ensure_future(layer.receive("cancel.one"))
    await wait_registered(layer, "cancel.one")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await layer.send("cancel.one", {"type": "kept"})
    assert await receive(layer, "cancel.one") == {"type": "kept"}


async def test_receive_cancelled_after_its_wake_up_loses_nothing(make_layer):
    layer = make_layer()
    channel = await layer.new_channel()
    task = asyncio.ensure_future(layer.receive(channel))
    await wait_registered(layer, channel)
    await layer.send(channel, {"type": "kept"})  # wakes the task ...
    task.cancel()  # ... which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stats(layer.segment_name)["queued"] == 1
    assert await receive(layer, channel) == {"type": "kept"}


async def test_cancelling_one_of_two_waiters_leaves_the_other_waiting(make_layer):
    layer = make_layer()
    first = asyncio.ensure_future(layer.receive("two.waiters"))
    second = asyncio.ensure_future(layer.receive("two.waiters"))
    await wait_registered(layer, "two.waiters")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await layer.send("two.waiters", {"type": "for.second"})
    assert await asyncio.wait_for(second, DEADLINE) == {"type": "for.second"}


async def test_receives_cancelled_at_random_points_lose_nothing(make_layer):
    layer = make_layer(capacity=1000)
    rng = random.Random(20240611)
    channel = await layer.new_channel()
    sent, got = 0, []
    for _ in range(300):
        task = asyncio.ensure_future(layer.receive(channel))
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
        if rng.random() < 0.6:
            await layer.send(channel, {"type": "m", "i": sent})
            sent += 1
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
        if rng.random() < 0.7:
            task.cancel()
        elif sent == len(got):  # it must not wait for ever: give it one
            await layer.send(channel, {"type": "m", "i": sent})
            sent += 1
        try:
            got.append((await asyncio.wait_for(task, DEADLINE))["i"])
        except asyncio.CancelledError:
            pass
        except TimeoutError:
            raise AssertionError("a receive with a message queued never returned")
    while len(got) < sent:
        got.append((await receive(layer, channel))["i"])
    assert got == list(range(sent))
    counts = stats(layer.segment_name)
    assert counts["queued"] == 0
    assert counts["received"] == sent


# Messages: msgpack only.


class Unpicklable:
    reduced = False

    def __reduce__(self):
        Unpicklable.reduced = True
        return (Unpicklable, ())


@pytest.mark.parametrize(
    "message, key",
    [
        ({"type": "m", "when": datetime.datetime(2024, 1, 1)}, "'when'"),
        ({"type": "m", "price": decimal.Decimal("1.5")}, "'price'"),
        ({"type": "m", "tags": {"a", "b"}}, "'tags'"),
        ({"type": "m", "data": {"inner": object()}}, "['data']['inner']"),
        ({"type": "m", "items": [1, Unpicklable()]}, "['items'][1]"),
        ({"type": "m", "big": 2**70}, "'big'"),
    ],
    ids=["datetime", "decimal", "set", "nested", "in-list", "huge-int"],
)
async def test_unserializable_value_is_a_type_error_naming_the_key(
    make_layer, message, key
):
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.group_add("typed", channel)
    for send in (
        lambda: layer.send(channel, message),
        lambda: layer.group_send("typed", message),
    ):
        with pytest.raises(TypeError) as caught:
            await send()
        assert key in str(caught.value)
    assert stats(layer.segment_name)["sent"] == 0


async def test_pickle_is_never_used(make_layer):
    layer = make_layer()
    Unpicklable.reduced = False
    with pytest.raises(TypeError):
        await layer.send("no.pickle", {"type": "m", "value": Unpicklable()})
    assert not Unpicklable.reduced


async def test_msgpack_types_round_trip(make_layer):
    layer = make_layer()
    message = {
        "type": "m",
        "text": "h\u00e9llo",
        "bytes": b"\x00\xffraw",
        "int": -(2**63),
        "uint": 2**64 - 1,
        "float": 1.25,
        "flags": [True, False, None],
        "tuple": (1, 2),
        "nested": {"deep": {"list": [1, "two", b"3"]}},
    }
    await layer.send("round.trip", message)
    got = await receive(layer, "round.trip")
    assert got == {**message, "tuple": [1, 2]}
    assert isinstance(got["bytes"], bytes)


async def test_large_message_round_trips(make_layer):
    layer = make_layer(size=8 * 1024 * 1024, max_message_size=2 * 1024 * 1024)
    body = os.urandom(1024 * 1024)
    channel = await layer.new_channel()
    await layer.group_add("large", channel)
    await layer.send(channel, {"type": "large", "body": body})
    await layer.group_send("large", {"type": "large", "body": body[::-1]})
    assert (await receive(layer, channel))["body"] == body
    assert (await receive(layer, channel))["body"] == body[::-1]
    assert stats(layer.segment_name)["used_blocks"] == 0


async def test_message_over_max_message_size_is_refused_before_anything_is_written(
    make_layer,
):
    layer = make_layer(max_message_size=1000)
    channel = await layer.new_channel()
    await layer.group_add("big", channel)
    await layer.send(channel, {"type": "small", "body": "x" * 900})
    assert (await receive(layer, channel))["type"] == "small"
    before = stats(layer.segment_name)
    big = {"type": "big", "body": "x" * 2000}
    with pytest.raises(MessageTooLarge) as caught:
        await layer.send(channel, big)
    assert isinstance(caught.value, ValueError)
    assert "max_message_size" in str(caught.value)
    with pytest.raises(MessageTooLarge):
        await layer.send("big.fresh.channel", big)
    with pytest.raises(MessageTooLarge):
        await layer.group_send("big", big)
    assert stats(layer.segment_name) == before


async def test_callers_dict_is_not_mutated(make_layer):
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.group_add("untouched", channel)
    message = {"type": "m", "nested": {"list": [1, 2, {"x": "y"}]}, "b": b"z"}
    original = copy.deepcopy(message)
    await layer.send(channel, message)
    await layer.group_send("untouched", message)
    assert message == original
    received = await receive(layer, channel)
    received["nested"]["list"].append("changed")
    received["type"] = "changed"
    assert message == original
    assert await receive(layer, channel) == original


async def test_two_receivers_never_get_the_same_dict_object(make_layer):
    layer = make_layer()
    first, second = await layer.new_channel(), await layer.new_channel()
    for channel in (first, second):
        await layer.group_add("pair", channel)
    await layer.group_send("pair", {"type": "m", "nested": {"list": [1]}})
    a, b = await receive(layer, first), await receive(layer, second)
    assert a == b
    assert a is not b
    assert a["nested"] is not b["nested"]
    assert a["nested"]["list"] is not b["nested"]["list"]
    await layer.send("twice", a)
    await layer.send("twice", a)
    c, d = await receive(layer, "twice"), await receive(layer, "twice")
    assert c == d == a and c is not d and c is not a


# Flush.


async def test_flush_drops_every_message_and_group(make_layer):
    layer = make_layer()
    other = make_layer()
    specific = await layer.new_channel()
    for i in range(3):
        await layer.send("flush.normal", {"type": "m", "i": i})
        await other.send(specific, {"type": "m", "i": i})
    await layer.group_add("flushed-group", specific)
    await layer.group_send("flushed-group", {"type": "m"})
    before = stats(layer.segment_name)
    assert before["queued"] == 7
    await other.flush()
    after = stats(layer.segment_name)
    assert after["queued"] == 0
    assert after["flushed"] == before["flushed"] + 7
    assert after["used_groups"] == 0 and after["used_members"] == 0
    await next_is_sentinel(layer, "flush.normal")
    await next_is_sentinel(layer, specific)
    await layer.group_send("flushed-group", {"type": "after.flush"})
    await next_is_sentinel(layer, specific)
    assert identity_holds(stats(layer.segment_name))


async def test_receive_waiting_across_a_flush_gets_the_next_message(make_layer):
    layer = make_layer()
    channel = await layer.new_channel()
    task = asyncio.ensure_future(layer.receive(channel))
    await wait_registered(layer, channel)
    await layer.flush()
    await make_layer().send(channel, {"type": "after.flush"})
    assert await asyncio.wait_for(task, DEADLINE) == {"type": "after.flush"}


# Close.


async def test_close_then_reuse(make_layer):
    layer = make_layer()
    name = layer.segment_name
    old = await layer.new_channel()
    await layer.send(old, {"type": "dropped"})
    slots_before = stats(name)["used_slots"]
    await layer.close()
    counts = stats(name)
    assert counts["used_slots"] == slots_before - 1
    assert counts["dropped_dead"] == 1 and counts["queued"] == 0
    await layer.send("reuse.normal", {"type": "again"})
    assert await receive(layer, "reuse.normal") == {"type": "again"}
    fresh = await layer.new_channel()
    assert fresh.split("!")[0] != old.split("!")[0]
    await layer.send(fresh, {"type": "fresh"})
    assert await receive(layer, fresh) == {"type": "fresh"}
    with pytest.raises(ForeignChannel):
        await layer.receive(old)
    assert stats(name)["used_slots"] == slots_before
    assert identity_holds(stats(name))


async def test_receive_waiting_across_close_still_gets_its_message(make_layer):
    layer = make_layer()
    other = make_layer()
    task = asyncio.ensure_future(layer.receive("across.close"))
    await wait_registered(layer, "across.close")
    await layer.close()
    await other.send("across.close", {"type": "after.close"})
    assert await asyncio.wait_for(task, DEADLINE) == {"type": "after.close"}


async def test_receives_after_a_close_that_interrupted_a_wait_are_woken(make_layer):
    layer = make_layer()
    other = make_layer()
    interrupted = asyncio.ensure_future(layer.receive("interrupted"))
    await wait_registered(layer, "interrupted")
    await layer.close()
    interrupted.cancel()
    with pytest.raises(asyncio.CancelledError):
        await interrupted
    for round in range(3):
        task = asyncio.ensure_future(layer.receive("after.reuse"))
        await wait_registered(layer, "after.reuse")
        await other.send("after.reuse", {"type": "woken", "round": round})
        got = await asyncio.wait_for(task, DEADLINE)
        assert got == {"type": "woken", "round": round}
    await other.send("interrupted", {"type": "kept"})
    assert await receive(layer, "interrupted") == {"type": "kept"}


async def test_close_keeps_normal_channel_messages_for_the_others(make_layer):
    leaving = make_layer()
    staying = make_layer()
    await leaving.send("survives.close", {"type": "kept"})
    await leaving.close()
    assert await receive(staying, "survives.close") == {"type": "kept"}


async def test_close_twice_is_harmless(make_layer):
    layer = make_layer()
    await layer.close()
    await layer.close()
    await layer.send("after.two.closes", {"type": "ok"})
    assert await receive(layer, "after.two.closes") == {"type": "ok"}
