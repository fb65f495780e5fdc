"""Group fan-out: one process group_sends, members in 4 other processes.

Each member process makes its share of the group's channels with
``new_channel()`` and adds them to the group, then runs one receive loop
per channel (a consumer each).  The sender group_sends ``count`` messages;
the rate is deliveries (messages x members) over the time from the first
group_send to the last delivery anywhere.  InMemoryChannelLayer runs the
same members and sender in one process.
"""

import asyncio
import time

from .harness import LABELS, calibrate, expect_all, message, payload_of, workers
from .stats import SeqCheck, merge_checks, summary

GROUP = "bench.fanout"
SIZE = 100
CONFIGS = ((100, 4), (1000, 4))  # (members, member processes)


async def setup(ctx, members):
    layer = ctx.layer
    channels = []
    for _ in range(members):
        channel = await layer.new_channel()
        await layer.group_add(GROUP, channel)
        channels.append(channel)
    ctx.state["channels"] = channels
    return len(channels)


async def _consume(layer, channel, count, check):
    for _ in range(count):
        check.see((await layer.receive(channel))["seq"])
    return time.monotonic_ns()


async def _consume_all(layer, channels, count, timeout):
    checks = [SeqCheck() for _ in channels]
    tasks = [
        asyncio.ensure_future(_consume(layer, channel, count, check))
        for channel, check in zip(channels, checks)
    ]
    await asyncio.sleep(0)  # every consumer is waiting now
    return tasks, checks


async def _finish(tasks, checks, count, timeout):
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    lasts = [task.result() for task in done if not task.exception()]
    return {
        "t_last": max(lasts) if lasts and not pending else None,
        "check": merge_checks(check.result(count) for check in checks),
    }


async def members(ctx, count, timeout):
    tasks, checks = await _consume_all(ctx.layer, ctx.state["channels"], count,
                                       timeout)
    ctx.signal("ready")
    return await _finish(tasks, checks, count, timeout)


async def _send_all(layer, count):
    payload = payload_of(SIZE)
    for seq in range(count):
        await layer.group_send(GROUP, message(seq, payload))


async def send(ctx, count):
    t0 = time.monotonic_ns()
    await _send_all(ctx.layer, count)
    return {"t0": t0, "t_sent": time.monotonic_ns()}


async def one_process(ctx, members, count, timeout):
    layer = ctx.layer
    if "channels" not in ctx.state:
        await setup(ctx, members)
    tasks, checks = await _consume_all(layer, ctx.state["channels"], count, timeout)
    t0 = time.monotonic_ns()
    await _send_all(layer, count)
    got = await _finish(tasks, checks, count, timeout)
    got["t0"] = t0
    return got


def _measure_group(sender, member_procs, members_total, count):
    for proc in member_procs:
        proc.start(members, count=count, timeout=300)
    expect_all(member_procs, "ready")
    sent = sender.call(send, count=count)
    got = expect_all(member_procs, "result")
    lasts = [g["t_last"] for g in got]
    ok = all(lasts)
    return {
        "count": count,
        "elapsed": (max(lasts) - sent["t0"]) / 1e9 if ok else None,
        "send_elapsed": (sent["t_sent"] - sent["t0"]) / 1e9,
        "check": merge_checks(g["check"] for g in got),
    }


def _measure_one(one, members_total, count):
    got = one.call(one_process, members=members_total, count=count, timeout=300)
    last = got["t_last"]
    return {
        "count": count,
        "elapsed": (last - got["t0"]) / 1e9 if last else None,
        "check": got["check"],
    }


def run(env):
    """Per group size, every layer's processes start first; each is
    calibrated, then each repeat runs every layer in turn, so that changes
    in the machine's state fall on all of them alike."""
    results = []
    for members_total, processes in CONFIGS:
        cap = env.pick(400_000, 100_000, 2_000) // members_total
        base = max(2, env.pick(20_000, 5_000, 200) // members_total)
        env.flush_redis()
        kinds = [k for k in ("dmb", "redis", "pubsub") if env.wants(k)]
        names = []
        for kind in kinds:
            # Capacity above the count: no member ever drops a message.
            spec = env.backends.spec(kind, capacity=cap + 10)
            names += [(spec, f"{kind}-sender")] + [
                (spec, f"{kind}-members-{i}") for i in range(processes)
            ]
        if env.wants("inmemory"):
            names.append((env.backends.spec("inmemory", capacity=cap + 10),
                          "inmemory-one-process"))
        with workers(names) as procs:
            measures = {}
            for i, kind in enumerate(kinds):
                group = procs[i * (processes + 1):(i + 1) * (processes + 1)]
                sender, member_procs = group[0], group[1:]
                for proc in member_procs:
                    proc.start(setup, members=members_total // processes)
                expect_all(member_procs, "result")
                measures[kind] = (
                    lambda count, s=sender, m=member_procs, n=members_total:
                    _measure_group(s, m, n, count)
                )
            if env.wants("inmemory"):
                measures["inmemory"] = (
                    lambda count, one=procs[-1], n=members_total:
                    _measure_one(one, n, count)
                )
            counts, warms, rounds = {}, {}, {k: [] for k in measures}
            for kind, measure in measures.items():
                counts[kind], warms[kind] = calibrate(
                    measure, base, env.target_seconds, cap
                )
            for _ in range(env.repeats):
                for kind, measure in measures.items():
                    rounds[kind].append(measure(counts[kind]))
        for kind in measures:
            where = 1 if kind == "inmemory" else processes
            results.append(_row(kind, members_total, where, counts[kind],
                                rounds[kind], warms[kind]))
            env.log(_line(results[-1]))
    env.backends.cleanup()
    return {"size": SIZE, "rows": results}


def _row(kind, members_total, processes, count, rounds, warm):
    rates = [
        r["elapsed"] and r["count"] * members_total / r["elapsed"] for r in rounds
    ]
    sends = [r.get("send_elapsed") and r["count"] / r["send_elapsed"] for r in rounds]
    return {
        "label": LABELS[kind],
        "layer": kind,
        "members": members_total,
        "processes": processes,
        "count": count,
        "deliveries_per_s": summary(rates),
        "group_sends_per_s": summary(sends),
        "check": merge_checks([r["check"] for r in rounds] + [warm["check"]]),
    }


def _line(row):
    rate = row["deliveries_per_s"]
    median = f"{rate['median']:,.0f}/s" if rate else "n/a"
    return (
        f"  fan-out {row['members']:>5} members  {row['label']:<24} "
        f"{row['processes']} proc  {median:>12} deliveries  lost "
        f"{row['check']['lost']} reordered {row['check']['reordered']}"
    )
