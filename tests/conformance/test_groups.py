"""The groups extension: group_add, group_discard, group_send."""

import asyncio

import pytest

from ._support import assert_no_message, needs, recv

pytestmark = pytest.mark.asyncio


@pytest.mark.timeout(20)
async def test_group_send_delivers_to_every_member(backend):
    layer = backend.make()
    members = [await layer.new_channel(prefix="member") for _ in range(3)]
    if not backend.lacks("foreign_members"):
        members.append("conformance.normal-member")
    for member in members:
        await layer.group_add("everyone", member)
    await layer.group_send("everyone", {"type": "test.hello", "text": "hi"})
    for member in members:
        assert await recv(layer, member) == {"type": "test.hello", "text": "hi"}
        await assert_no_message(layer, member, wait=0.1)


@pytest.mark.timeout(20)
async def test_group_send_preserves_order_per_member(backend):
    layer = backend.make()
    member = await layer.new_channel()
    await layer.group_add("ordered", member)
    for n in range(20):
        await layer.group_send("ordered", {"type": "test.seq", "n": n})
    received = [(await recv(layer, member))["n"] for _ in range(20)]
    assert received == list(range(20))


@pytest.mark.timeout(20)
async def test_group_discard_stops_delivery(backend):
    layer = backend.make()
    stays, leaves = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("room", stays)
    await layer.group_add("room", leaves)
    await layer.group_discard("room", leaves)
    await layer.group_send("room", {"type": "test.after-discard"})
    assert await recv(layer, stays) == {"type": "test.after-discard"}
    await assert_no_message(layer, leaves)


@pytest.mark.timeout(20)
async def test_group_discard_of_absent_member_is_noop(backend):
    layer = backend.make()
    member, stranger = await layer.new_channel(), await layer.new_channel()
    # Never-created group, and a channel that never joined an existing one.
    await layer.group_discard("no-such-group", member)
    await layer.group_add("room", member)
    await layer.group_discard("room", stranger)
    await layer.group_discard("room", stranger)
    await layer.group_send("room", {"type": "test.still-here"})
    assert await recv(layer, member) == {"type": "test.still-here"}
    await assert_no_message(layer, stranger)


@pytest.mark.timeout(20)
async def test_group_add_twice_delivers_once(backend):
    layer = backend.make()
    member = await layer.new_channel()
    await layer.group_add("room", member)
    await layer.group_add("room", member)
    await layer.group_send("room", {"type": "test.once"})
    assert await recv(layer, member) == {"type": "test.once"}
    await assert_no_message(layer, member)
    # One discard is enough to leave, however often the channel joined.
    await layer.group_discard("room", member)
    await layer.group_send("room", {"type": "test.gone"})
    await assert_no_message(layer, member)


@pytest.mark.timeout(20)
async def test_group_send_to_group_without_members_is_noop(backend):
    layer = backend.make()
    await layer.group_send("nobody-here", {"type": "test.void"})
    member = await layer.new_channel()
    await layer.group_add("emptied", member)
    await layer.group_discard("emptied", member)
    await layer.group_send("emptied", {"type": "test.void"})
    await assert_no_message(layer, member)


@pytest.mark.timeout(20)
async def test_channel_in_several_groups_receives_from_each(backend):
    layer = backend.make()
    member = await layer.new_channel()
    for group in ("alpha", "beta", "gamma"):
        await layer.group_add(group, member)
    for group in ("alpha", "beta", "gamma"):
        await layer.group_send(group, {"type": "test.from", "group": group})
    received = [(await recv(layer, member))["group"] for _ in range(3)]
    assert received == ["alpha", "beta", "gamma"]
    await assert_no_message(layer, member)


@pytest.mark.timeout(30)
async def test_group_send_reaches_many_members(backend):
    layer = backend.make()
    members = [await layer.new_channel() for _ in range(100)]
    for member in members:
        await layer.group_add("crowd", member)
    await asyncio.wait_for(layer.group_send("crowd", {"type": "test.all"}), 5)
    for member in members:
        assert await recv(layer, member) == {"type": "test.all"}


@pytest.mark.timeout(20)
@needs("shared_state")
async def test_group_is_shared_between_layer_instances(backend):
    owner, other = backend.make(), backend.make()
    member = await owner.new_channel()
    await owner.group_add("shared-room", member)
    await asyncio.sleep(0.1)  # lets a subscribing backend subscribe
    await other.group_send("shared-room", {"type": "test.from-other"})
    assert await recv(owner, member) == {"type": "test.from-other"}
