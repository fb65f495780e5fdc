"""BR-08: the caller's message dict is not mutated or shared between
receivers."""

import copy

import pytest

from .support import br08_owner, nothing_arrives

pytestmark = pytest.mark.asyncio

RESERVED = "__asgi_channel__"


@pytest.mark.timeout(60)
async def test_br08_message_dict_untouched_and_copies_independent(
    make_layer, prefix, children
):
    layer = make_layer()  # process S
    owner = children.start(br08_owner, prefix, {}, name="R")
    a, b = await owner.expect("channels")

    m = {"type": "t", "payload": {"x": 1}}
    saved = copy.deepcopy(m)
    payload = m["payload"]
    await layer.send(a, m)
    await layer.send(b, m)
    await layer.group_add("g", a)
    await layer.group_add("g", b)
    await layer.group_send("g", m)
    await layer.send("plain", m)
    assert m == saved
    assert list(m) == list(saved) and list(m["payload"]) == ["x"]
    assert m["payload"] is payload

    owner.tell("sent")
    got = await owner.expect("received")
    for key in ("a_direct", "a_group", "b_direct", "b_group", "plain"):
        assert got[key] == saved, (key, got[key])
        assert RESERVED not in got[key], key
    # b's group copy was not touched by the change to a's.
    assert got["b_group"]["payload"]["x"] == 1
    assert got["distinct_dicts"] == 5
    assert got["distinct_payloads"] == 5

    # A message carrying the reserved key: refused, or delivered unchanged;
    # never routed to a channel called "x".
    sneaky = {"type": "t", RESERVED: "x"}
    try:
        await layer.send(a, sneaky)
    except Exception:  # noqa: BLE001 - any clear refusal will do
        owner.tell("reserved", "refused")
    else:
        owner.tell("reserved", "sent")
        assert await owner.expect("reserved") == sneaky
    assert sneaky == {"type": "t", RESERVED: "x"}
    assert await nothing_arrives(layer, "x", 0.5)
    await owner.expect("result")
    await children.join([owner], timeout=10)
