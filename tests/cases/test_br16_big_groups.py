"""BR-16: big groups, many receivers at once, concurrent group_send while
members change."""

import asyncio
import random
import time
from collections import Counter

import pytest

from .support import TEST_SIZE, br16_receiver, drain

pytestmark = pytest.mark.asyncio

RECEIVERS = 4
PER_RECEIVER = 250
PART_A = 20
PART_B = 50
# 1,000 members with up to 70 messages each queued at once if the readers
# fall behind, plus the members that come and go.
CONFIG = {"size": 8 * TEST_SIZE}


@pytest.mark.timeout(120)
async def test_br16_big_group_and_concurrent_sends_with_churn(
    make_layer, prefix, children
):
    producer = make_layer(**CONFIG)  # process P
    receivers = [
        children.start(
            br16_receiver,
            prefix,
            CONFIG,
            PER_RECEIVER,
            PART_A,
            PART_B,
            n == 0,  # one receiver also churns members of its own
            name=f"R{n}",
        )
        for n in range(RECEIVERS)
    ]
    for link in receivers:
        await link.expect("ready", timeout=60)

    # Part A: 20 group sends, one straight after another.
    started = time.monotonic()
    for k in range(1, PART_A + 1):
        call_started = time.monotonic()
        await producer.group_send("all", {"n": k})
        assert time.monotonic() - call_started < 1.0, k
    finished = [await link.expect("a-done", timeout=30) for link in receivers]
    assert max(finished) - started <= 10.0, max(finished) - started

    # Part B: 50 concurrent group sends while members come and go, here and
    # in receiver R0.
    for link in receivers:
        link.tell("b")

    async def send_one(k):
        # Each starts at its own moment, so the sends interleave with the
        # churn below instead of all running before it.
        await asyncio.sleep(random.uniform(0, 0.05))
        await producer.group_send("all", {"c": k})

    async def churn():
        made = []
        for _ in range(500):
            channel = await producer.new_channel()
            await producer.group_add("all", channel)
            await asyncio.sleep(0)
            await producer.group_discard("all", channel)
            made.append(channel)
        return made

    churning = asyncio.ensure_future(churn())
    await asyncio.wait_for(asyncio.gather(*(send_one(k) for k in range(PART_B))), 5.0)
    short_lived = await asyncio.wait_for(churning, 30)
    ours = await asyncio.gather(*(drain(producer, c, idle=0.5) for c in short_lived))

    results = [await link.expect("result", timeout=60) for link in receivers]
    await children.join(receivers, timeout=10)

    first = [("n", k) for k in range(1, PART_A + 1)]
    every_c = Counter(range(PART_B))
    members = 0
    for result in results:
        assert result["extra"] == 0
        for log in result["logs"]:
            members += 1
            assert log[:PART_A] == first, log[:PART_A]
            rest = log[PART_A:]
            assert all(key == "c" for key, _ in rest), rest
            assert Counter(value for _, value in rest) == every_c, rest
    assert members == RECEIVERS * PER_RECEIVER

    short = [[m["c"] for m in got] for got in ours] + results[0]["churned"]
    assert len(short) >= 500 and results[0]["churned"], "R0 churned nothing"
    for got in short:
        assert len(got) == len(set(got)), got  # at most one copy of each
        assert set(got) <= set(range(PART_B))
