"""BR-04: group membership expiry, no-op discards, groups that don't exist."""

import asyncio
import time

import pytest

from .support import br04_members

pytestmark = pytest.mark.asyncio


@pytest.mark.timeout(60)
async def test_br04_expired_members_and_missing_groups(make_layer, prefix, children):
    config = {"group_expiry": 2}
    layer = make_layer(**config)  # process A
    b_proc = children.start(br04_members, prefix, config, name="B")
    names = await b_proc.expect("channels")
    a, b, t0 = names["a"], names["b"], names["t0"]
    await b_proc.expect("refreshed")

    # Step 4, at t = 3.5: a joined 3.5 s ago, b's membership 1.7 s ago.
    await asyncio.sleep(max(0.0, t0 + 3.5 - time.monotonic()))
    await layer.group_send("g", {"n": 1})
    await layer.group_send("g2", {"n": 2})
    b_proc.tell("sent")
    got = await b_proc.expect("step5")
    assert got["b"] == [{"n": 1}]
    assert got["a"] == []
    assert got["others"] == [[], [], []]

    # Step 6: none of these may raise.
    await layer.group_send("never-created", {"n": 0})
    await layer.group_discard("never-created", a)
    await layer.group_discard("g", "some.unknown-channel")
    await layer.group_add("g", b)
    await layer.group_add("g", b)
    await layer.group_send("g", {"n": 3})
    b_proc.tell("step6")
    got = await b_proc.expect("step6")
    assert got["b"] == [{"n": 3}]  # twice added, delivered once
    assert got["a"] == []  # a stays expired
    await b_proc.expect("result")
    await children.join([b_proc], timeout=10)
