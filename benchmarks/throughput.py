"""Throughput: one sender process streams messages to one receiver process.

The receiver takes a channel from ``new_channel()`` (what a consumer does)
and receives ``count`` messages; the sender sends them as fast as the layer
takes them, backing off briefly when the layer says the channel is full.
The rate is ``count`` over the time from the sender's first send to the
receiver's last receive.  InMemoryChannelLayer runs in one process (sender
and receiver tasks on one loop), and dmb does too, for comparison.
"""

import asyncio
import time

from channels.exceptions import ChannelFull

from .harness import LABELS, calibrate, message, payload_of, workers
from .stats import SeqCheck, merge_checks, summary

SIZES = (100, 10_000, 256 * 1024)
#: Channel capacity per message size, the same for every layer; sized so
#: that a full channel of the largest messages fits in dmb's segment.
CAPACITY = {100: 100_000, 10_000: 10_000, 256 * 1024: 400}


async def setup_receiver(ctx):
    ctx.state["channel"] = await ctx.layer.new_channel()
    return ctx.state["channel"]


async def _receive_all(layer, channel, count, check):
    for _ in range(count):
        check.see((await layer.receive(channel))["seq"])
    return time.monotonic_ns()


async def receive(ctx, count, timeout):
    check = SeqCheck()
    ctx.signal("ready")
    try:
        last = await asyncio.wait_for(
            _receive_all(ctx.layer, ctx.state["channel"], count, check), timeout
        )
    except asyncio.TimeoutError:
        last = None
    return {"t_last": last, "check": check.result(count)}


async def _send_all(layer, channel, count, size, pause):
    payload = payload_of(size)
    full = 0
    for seq in range(count):
        msg = message(seq, payload)
        while True:
            try:
                await layer.send(channel, msg)
                break
            except ChannelFull:
                full += 1
                await asyncio.sleep(pause)
    return full


async def send(ctx, channel, count, size):
    t0 = time.monotonic_ns()
    full = await _send_all(ctx.layer, channel, count, size, 0.0005)
    return {"t0": t0, "t_sent": time.monotonic_ns(), "full_retries": full}


async def one_process(ctx, count, size, timeout):
    layer = ctx.layer
    channel = await layer.new_channel()
    check = SeqCheck()
    receiver = asyncio.ensure_future(_receive_all(layer, channel, count, check))
    await asyncio.sleep(0)  # the receiver is waiting now
    t0 = time.monotonic_ns()
    full = await _send_all(layer, channel, count, size, 0)
    try:
        last = await asyncio.wait_for(receiver, timeout)
    except asyncio.TimeoutError:
        last = None
    return {
        "elapsed": (last - t0) / 1e9 if last else None,
        "check": check.result(count),
        "full_retries": full,
    }


def _row(kind, where, rounds, count):
    rates = [r["elapsed"] and r["count"] / r["elapsed"] for r in rounds]
    return {
        "label": LABELS[kind],
        "layer": kind,
        "processes": where,
        "count": count,
        "rate": summary(rates),
        "mb_per_s": None,
        "check": merge_checks(r["check"] for r in rounds),
        "full_retries": sum(r.get("full_retries", 0) for r in rounds),
    }


def run(env):
    results = {size: [] for size in SIZES}
    cap = {
        100: env.pick(500_000, 100_000, 2_000),
        10_000: env.pick(50_000, 10_000, 200),
        256 * 1024: env.pick(3_000, 600, 20),
    }
    base = {100: env.pick(2_000, 1_000, 200), 10_000: env.pick(500, 200, 50),
            256 * 1024: env.pick(50, 20, 5)}
    for kind in ("dmb", "redis", "pubsub"):
        if not env.wants(kind):
            continue
        for size in SIZES:
            env.flush_redis()
            spec = env.backends.spec(kind, capacity=CAPACITY[size])
            with workers([(spec, "sender"), (spec, "receiver")]) as (snd, rcv):
                channel = rcv.call(setup_receiver)

                def measure(count, snd=snd, rcv=rcv, channel=channel, size=size):
                    rcv.start(receive, count=count, timeout=120)
                    rcv.expect("ready")
                    sent = snd.call(send, channel=channel, count=count, size=size)
                    got = rcv.expect("result")
                    last = got["t_last"]
                    return {
                        "count": count,
                        "elapsed": (last - sent["t0"]) / 1e9 if last else None,
                        "check": got["check"],
                        "full_retries": sent["full_retries"],
                    }

                count, warm = calibrate(measure, base[size], env.target_seconds,
                                        cap[size])
                rounds = [measure(count) for _ in range(env.repeats)]
            row = _row(kind, 2, rounds, count)
            row["check"] = merge_checks([row["check"], warm["check"]])
            results[size].append(_finish(row, size))
            env.log(_line(size, row))
    for kind in ("inmemory", "dmb"):
        if not env.wants(kind):
            continue
        for size in SIZES:
            spec = env.backends.spec(kind, capacity=CAPACITY[size])
            with workers([(spec, "one-process")]) as (one,):

                def measure(count, one=one, size=size):
                    got = one.call(one_process, count=count, size=size, timeout=120)
                    got["count"] = count
                    return got

                count, warm = calibrate(measure, base[size], env.target_seconds,
                                        cap[size])
                rounds = [measure(count) for _ in range(env.repeats)]
            row = _row(kind, 1, rounds, count)
            row["check"] = merge_checks([row["check"], warm["check"]])
            results[size].append(_finish(row, size))
            env.log(_line(size, row))
    env.backends.cleanup()
    return {"sizes": list(SIZES), "rows": {str(s): rows for s, rows in results.items()}}


def _finish(row, size):
    rate = row["rate"]
    if rate:
        row["mb_per_s"] = {k: v * size / 1e6 for k, v in rate.items() if k != "values"}
    return row


def _line(size, row):
    rate = row["rate"]
    median = f"{rate['median']:,.0f}/s" if rate else "n/a"
    return (
        f"  throughput {size:>7} B  {row['label']:<24} {row['processes']} proc  "
        f"{median:>12}  lost {row['check']['lost']} reordered "
        f"{row['check']['reordered']}"
    )
