"""How dmb's cost per operation grows: channels, group size, processes, size.

* channels: N channels exist (each holds one queued message, so none is
  dropped as idle); time a send+receive pair on a random one of them, and
  on one fixed channel, as N goes 10 -> 100,000; and the random pairs
  again with the layer's cache of validated names switched off.
* group size: time group_send to a group of 1 -> 10,000 members (normal
  channels), per call and per delivery.
* processes: 1 -> 16 processes, each doing send+receive pairs on its own
  channel at the same time: aggregate pairs/s and CPU per pair.
* message size: a send+receive pair of 100 B -> 1 MB messages.

All in dmb's Channels API (``await layer.send`` / ``receive`` /
``group_send``), in worker processes, on a 256 MiB segment.
"""

import asyncio
import random
import time

from .harness import cpu_seconds, expect_all, message, payload_of, workers
from .stats import SeqCheck, merge_checks, summary

CHANNEL_COUNTS = (10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000)
GROUP_SIZES = (1, 3, 10, 30, 100, 300, 1_000, 3_000, 10_000)
PROCESS_COUNTS = (1, 2, 4, 8, 16)
MESSAGE_SIZES = (100, 1_000, 10_000, 100_000, 1_000_000)


# Channels.


async def channels(ctx, counts, ops, repeats):
    layer = ctx.layer
    payload = payload_of(100)
    names = []
    sent, taken = [], []  # per channel: next seq to send, next seq expected
    check = {"sent": 0, "received": 0, "lost": 0, "reordered": 0}
    rows = []
    rng = random.Random(7)
    for n in counts:
        while len(names) < n:
            name = f"bench.scale.{len(names)}"
            layer.send_sync(name, message(0, payload))
            names.append(name)
            sent.append(1)
            taken.append(0)
        row = {"channels": n, "random_us": [], "one_us": [], "random_nocache_us": []}
        for _ in range(repeats):
            picks = [rng.randrange(n) for _ in range(ops)]
            row["random_us"].append(
                await _pairs(layer, names, picks, payload, sent, taken, check)
            )
            row["one_us"].append(
                await _pairs(layer, names, [n // 2] * ops, payload, sent, taken, check)
            )
            # The same random pairs with the layer's cache of validated names
            # kept empty: what a working set too big for that cache pays.
            cache = layer._valid_names, layer._valid_names_older
            layer._valid_names = layer._valid_names_older = _NoCache()
            try:
                row["random_nocache_us"].append(
                    await _pairs(layer, names, picks, payload, sent, taken, check)
                )
            finally:
                layer._valid_names, layer._valid_names_older = cache
        stats = ffi_stats(layer)
        row["used_channels"] = stats["used_channels"]
        for key in ("random_us", "one_us", "random_nocache_us"):
            row[key] = summary(row[key])
        rows.append(row)
    return {"rows": rows, "check": check}


class _NoCache(set):
    """A set that keeps nothing: dmb's name cache, switched off."""

    def add(self, item):
        pass


async def _pairs(layer, names, picks, payload, sent, taken, check):
    got = []
    t0 = time.perf_counter()
    for i in picks:
        name = names[i]
        await layer.send(name, message(sent[i], payload))
        got.append((await layer.receive(name))["seq"])
        sent[i] += 1
    elapsed = time.perf_counter() - t0
    # Each receive took the oldest message of its channel: check them all.
    for i, seq in zip(picks, got):
        check["sent"] += 1
        check["received"] += 1
        if seq != taken[i]:
            check["reordered"] += 1
        taken[i] = seq + 1
    return elapsed / len(picks) * 1e6


def ffi_stats(layer):
    from dmb._ring_cffi import ffi, lib

    stats = ffi.new("struct dmb_stats *")
    lib.dmb_stats(layer._h, stats)
    return {
        "used_channels": stats.used_channels,
        "used_members": stats.used_members,
        "used_nodes": stats.used_nodes,
        "used_blocks": stats.used_blocks,
        "queued": stats.queued,
        "dropped_full": stats.counters.dropped_full,
        "sent": stats.counters.sent,
        "received": stats.counters.received,
    }


# Group size.


async def groups(ctx, sizes, budget, repeats):
    from dmb._ring_cffi import lib

    layer = ctx.layer
    payload = payload_of(100)
    rows = []
    check = {"sent": 0, "received": 0, "lost": 0, "reordered": 0}
    for size in sizes:
        group = f"bench.group.{size}"
        members = [f"bench.g{size}.{i}" for i in range(size)]
        for channel in members:
            await layer.group_add(group, channel)
        calls = max(5, min(2_000, budget // size))
        per_call = []
        for _ in range(repeats):
            before = ffi_stats(layer)
            t0 = time.perf_counter()
            for seq in range(calls):
                await layer.group_send(group, message(seq, payload))
            per_call.append((time.perf_counter() - t0) / calls * 1e6)
            after = ffi_stats(layer)
            delivered = after["queued"] - before["queued"]
            check["sent"] += calls * size
            check["received"] += delivered
            check["lost"] += calls * size - delivered
            # Read three members' queues through, in order; purge the rest.
            for channel in {members[0], members[size // 2], members[-1]}:
                seqs = SeqCheck()
                for _ in range(calls):
                    seqs.see((await layer.receive(channel))["seq"])
                check["reordered"] += seqs.reordered
            for channel in members:
                name = channel.encode()
                lib.dmb_purge(layer._h, name, len(name))
        rows.append({
            "members": size,
            "calls": calls,
            "per_call_us": summary(per_call),
            "per_delivery_ns": summary([v / size * 1000 for v in per_call]),
        })
        for channel in members:
            await layer.group_discard(group, channel)
    return {"rows": rows, "check": check}


# Processes.


async def pairs_at(ctx, ops, start_at):
    layer = ctx.layer
    payload = payload_of(100)
    name = f"bench.proc.{ctx.name}"
    delay = (start_at - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)
    check = SeqCheck()
    cpu = cpu_seconds()
    t0 = time.monotonic_ns()
    for seq in range(ops):
        await layer.send(name, message(seq, payload))
        check.see((await layer.receive(name))["seq"])
    t1 = time.monotonic_ns()
    return {"t0": t0, "t1": t1, "cpu": cpu_seconds() - cpu,
            "check": check.result(ops)}


# Message size.


async def sizes(ctx, sizes, budget, repeats):
    layer = ctx.layer
    rows = []
    check = SeqCheck()
    seq = 0
    for size in sizes:
        payload = payload_of(size)
        ops = max(20, min(20_000, budget // size))
        per_pair = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(ops):
                await layer.send("bench.size", message(seq, payload))
                got = await layer.receive("bench.size")
                check.see(got["seq"])
                seq += 1
            per_pair.append((time.perf_counter() - t0) / ops * 1e6)
        rows.append({
            "size": size,
            "ops": ops,
            "per_pair_us": summary(per_pair),
            "mb_per_s": summary([size / us for us in per_pair]),
        })
    return {"rows": rows, "check": check.result(seq)}


def run(env):
    repeats = env.repeats
    out = {}
    spec = env.backends.spec("dmb", capacity=100_000)
    with workers([(spec, "scaling")]) as (w,):
        out["channels"] = w.call(
            channels,
            counts=env.pick(CHANNEL_COUNTS, CHANNEL_COUNTS, (10, 100, 1000)),
            ops=env.pick(20_000, 5_000, 200),
            repeats=repeats,
        )
        for row in out["channels"]["rows"]:
            env.log(
                f"  scaling channels {row['channels']:>7}: pair "
                f"{row['random_us']['median']:6.2f} us (random channel), "
                f"{row['random_nocache_us']['median']:6.2f} us (name cache off), "
                f"{row['one_us']['median']:6.2f} us (one channel)"
            )
        out["groups"] = w.call(
            groups,
            sizes=env.pick(GROUP_SIZES, GROUP_SIZES, (1, 10, 100)),
            budget=env.pick(200_000, 50_000, 500),
            repeats=repeats,
        )
        for row in out["groups"]["rows"]:
            env.log(
                f"  scaling group {row['members']:>6} members: group_send "
                f"{row['per_call_us']['median']:9.1f} us, "
                f"{row['per_delivery_ns']['median']:7.0f} ns per member"
            )
        out["sizes"] = w.call(
            sizes,
            sizes=env.pick(MESSAGE_SIZES, MESSAGE_SIZES, (100, 10_000)),
            budget=env.pick(400_000_000, 100_000_000, 1_000_000),
            repeats=repeats,
        )
        for row in out["sizes"]["rows"]:
            env.log(
                f"  scaling size {row['size']:>8} B: pair "
                f"{row['per_pair_us']['median']:8.1f} us, "
                f"{row['mb_per_s']['median']:7.1f} MB/s"
            )
    out["processes"] = _processes(env, spec)
    env.backends.cleanup()
    return out


def _processes(env, spec):
    counts = env.pick(PROCESS_COUNTS, PROCESS_COUNTS, (1, 2))
    ops = env.pick(20_000, 5_000, 200)
    rows = []
    checks = []
    names = [(spec, f"p{i}") for i in range(max(counts))]
    with workers(names) as procs:
        for n in counts:
            rates, cpus, walls = [], [], []
            for _ in range(env.repeats):
                start_at = time.monotonic_ns() + 300_000_000
                for proc in procs[:n]:
                    proc.start(pairs_at, ops=ops, start_at=start_at)
                got = expect_all(procs[:n], "result")
                span = (max(g["t1"] for g in got) - min(g["t0"] for g in got)) / 1e9
                rates.append(n * ops / span)
                cpus.append(sum(g["cpu"] for g in got) / (n * ops) * 1e6)
                walls.append(span / ops * 1e6)
                checks += [g["check"] for g in got]
            rows.append({
                "processes": n,
                "ops_per_process": ops,
                "pairs_per_s": summary(rates),
                "cpu_us_per_pair": summary(cpus),
                "wall_us_per_pair_per_process": summary(walls),
            })
            env.log(
                f"  scaling processes {n:>2}: {rows[-1]['pairs_per_s']['median']:,.0f}"
                f" pairs/s in all, CPU {rows[-1]['cpu_us_per_pair']['median']:.2f} us"
                f" per pair"
            )
    return {"rows": rows, "check": merge_checks(checks)}
