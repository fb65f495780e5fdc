"""BR-02: group_send past a full member; capacity counted per channel."""

import logging

import pytest
from channels.exceptions import ChannelFull

from .support import br02_members

pytestmark = pytest.mark.asyncio

CONFIG = {"capacity": 3, "channel_capacity": {"tiny*": 1}}


@pytest.mark.timeout(60)
async def test_br02_group_send_skips_full_members_and_logs(
    make_layer, prefix, children, caplog
):
    caplog.set_level(logging.INFO, logger="dmb.layer")
    layer = make_layer(**CONFIG)  # process A
    b = children.start(br02_members, prefix, CONFIG, name="B")
    _c1, c2, t = await b.expect("channels")

    await layer.send(c2, {"type": "pre"})
    for k in (1, 2, 3, 4):
        await layer.group_send("g", {"type": "g", "n": k})  # never raises

    with pytest.raises(ChannelFull):
        await layer.send(c2, {"type": "late"})
    with pytest.raises(ChannelFull):
        await layer.send(t, {"type": "late"})

    b.tell("drain")
    got_c1, got_c2, got_t = await b.expect("drained")
    assert got_c1 == [{"type": "g", "n": n} for n in (1, 2, 3)]
    assert got_c2 == [{"type": "pre"}] + [{"type": "g", "n": n} for n in (1, 2)]
    assert got_t == [{"type": "g", "n": 1}]

    # Draining freed the space: every member takes the next one.
    await layer.group_send("g", {"type": "g", "n": 5})
    b.tell("again")
    assert await b.expect("again") == [[{"type": "g", "n": 5}]] * 3
    await b.expect("result")
    await children.join([b], timeout=10)

    skipped = [
        record
        for record in caplog.records
        if record.name == "dmb.layer"
        and record.levelno in (logging.INFO, logging.WARNING)
        and "'g'" in record.getMessage()
        and "capacity" in record.getMessage()
    ]
    assert skipped, [record.getMessage() for record in caplog.records]
    # It says how many members of how many were skipped: k=2 skipped t, and
    # k=3 skipped c2 and t, of the group's 3.
    messages = [record.getMessage() for record in skipped]
    assert any("1 of 3" in m for m in messages), messages
    assert any("2 of 3" in m for m in messages), messages
