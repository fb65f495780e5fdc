"""BR-10: ordering from one producer to one channel, through group_send and
send."""

import pytest

from .support import TEST_SIZE, br10_reader

pytestmark = pytest.mark.asyncio

N = 3000
# Room for everything queued at once: 3 group copies, x's direct ones, status.
CONFIG = {"capacity": 5000, "size": 4 * TEST_SIZE}


@pytest.mark.timeout(90)
async def test_br10_order_kept_through_group_send_and_send(
    make_layer, prefix, children
):
    producer = make_layer(**CONFIG)  # process P
    x_expected = []
    for i in range(N):
        x_expected.append({"i": i})
        if i % 10 == 0:
            x_expected.append({"i": i, "direct": True})
    assert len(x_expected) == 3300

    r1 = children.start(br10_reader, prefix, CONFIG, 2, False, [3300, N], name="R1")
    r2 = children.start(br10_reader, prefix, CONFIG, 1, True, [N, N], name="R2")
    await r2.expect("channels")  # z: R2 reads it and "status"
    x, _y = await r1.expect("channels")

    for i in range(N):
        await producer.group_send("progress", {"i": i})
        if i % 10 == 0:
            await producer.send(x, {"i": i, "direct": True})
        await producer.send("status", {"i": i})

    one = await r1.expect("result", timeout=60)
    two = await r2.expect("result", timeout=60)
    await children.join([r1, r2], timeout=10)
    got_x, got_y = one["got"]
    got_z, got_status = two["got"]
    in_order = [{"i": i} for i in range(N)]
    assert got_y == in_order
    assert got_z == in_order
    assert got_x == x_expected
    assert got_status == in_order
    assert one["extra"] == [[], []] and two["extra"] == [[], []]
