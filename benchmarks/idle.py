"""Idle cost: what 1,000 waiting receives cost when nothing arrives.

Four processes per layer each make 250 channels with ``new_channel()`` and
start a receive on every one (a consumer each), then sit with their event
loop running.  The harness reads each process's CPU time from outside,
``/proc/<pid>/schedstat`` (nanoseconds on CPU, every thread), at the start
and at the end of the idle window, so the measurement itself runs nothing
in the processes measured.  Afterwards a sender puts one message on every
channel, and each receive must get it: the receives were live all along.
InMemoryChannelLayer holds its 1,000 receives in one process.

All layers idle at the same time, so one window serves them all; the
redis-server's own CPU over the window is reported on its own row (it
serves both channels_redis layers).  A process with no layer and no
receive, measured the same way, is the floor.
"""

import asyncio
import time

from .harness import LABELS, expect_all, message, workers
from .stats import merge_checks, summary

RECEIVES = 1000
PROCESSES = 4


def on_cpu_seconds(pid):
    """Time a process has spent on a CPU, all its threads (schedstat)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


async def _one(layer, channel):
    msg = await layer.receive(channel)
    return msg["seq"] == 0


async def hold(ctx, receives, settle, until, timeout, wake_self=False):
    """Wait on ``receives`` channels; sit idle until ``until`` (monotonic ns)."""
    layer = ctx.layer
    channels = [await layer.new_channel() for _ in range(receives)]
    tasks = [asyncio.ensure_future(_one(layer, c)) for c in channels]
    await asyncio.sleep(settle)  # subscriptions and first waits are done
    ctx.signal("ready", time.monotonic_ns())
    await asyncio.sleep(max(0.0, (until - time.monotonic_ns()) / 1e9))
    ctx.signal("idle")
    if wake_self:
        for channel in channels:
            await layer.send(channel, message(0, b""))
    else:
        ctx.signal("channels", channels)
    done, pending = set(), set()
    if tasks:
        done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    received = sum(1 for t in done if not t.exception() and t.result())
    errors = sorted({repr(t.exception()) for t in done if t.exception()})
    return {
        "errors": errors[:3],
        "check": {"sent": receives, "received": received,
                  "lost": receives - received, "reordered": 0},
    }


async def wake(ctx, channels):
    for channel in channels:
        await ctx.layer.send(channel, message(0, b""))
    return len(channels)


def run(env):
    duration = env.idle_seconds
    settle = env.pick(2.0, 1.0, 0.2)
    setup = env.pick(15.0, 10.0, 5.0)  # time allowed to reach "ready"
    margin = 1.0  # idle time kept before and after the window
    kinds = [k for k in ("dmb", "redis", "pubsub") if env.wants(k)]
    env.flush_redis()
    names, plan = [], []
    for kind in kinds:
        # channels_redis core counts capacity per process for specific
        # channels: room for every message the waker sends.
        spec = env.backends.spec(kind, capacity=RECEIVES * 2)
        first = len(names)
        names += [(spec, f"{kind}-idle-{i}") for i in range(PROCESSES)]
        names.append((spec, f"{kind}-waker"))
        plan.append((kind, first, PROCESSES))
    if env.wants("inmemory"):
        plan.append(("inmemory", len(names), 1))
        names.append((env.backends.spec("inmemory"), "inmemory-idle"))
    # The measurement's own floor: a process with no layer and no receives.
    plan.append(("floor", len(names), 1))
    names.append((env.backends.spec("pipe"), "floor"))
    per_kind = {kind: {"cpu": [], "checks": [], "errors": set()}
                for kind, _, _ in plan}
    server = []
    late = 0
    with workers(names) as procs:
        for _ in range(env.repeats):
            start = time.monotonic_ns() + int(setup * 1e9)
            end = start + int(duration * 1e9)
            holders = []
            for kind, first, count in plan:
                receives = 0 if kind == "floor" else RECEIVES // count
                for proc in procs[first:first + count]:
                    proc.start(hold, receives=receives, settle=settle,
                               until=end + int(margin * 1e9), timeout=120,
                               wake_self=kind in ("inmemory", "floor"))
                    holders.append((kind, proc))
            ready = expect_all([p for _, p in holders], "ready", setup + 60)
            late += sum(1 for t in ready if t > start - int(margin * 1e9))
            time.sleep(max(0.0, (start - time.monotonic_ns()) / 1e9))
            before = {p.pid: on_cpu_seconds(p.pid) for _, p in holders}
            redis_before = env.redis.cpu_seconds() if env.redis else None
            time.sleep(max(0.0, (end - time.monotonic_ns()) / 1e9))
            used = {p.pid: on_cpu_seconds(p.pid) - before[p.pid] for _, p in holders}
            if env.redis:
                server.append(env.redis.cpu_seconds() - redis_before)
            expect_all([p for _, p in holders], "idle", margin + 60)
            for kind, first, count in plan:
                if kind in ("inmemory", "floor"):
                    continue
                channels = []
                for proc in procs[first:first + count]:
                    channels += proc.expect("channels")
                procs[first + count].call(wake, channels=channels)
            results = {}
            for kind, proc in holders:
                results.setdefault(kind, []).append(proc.expect("result", 300))
            for kind, got in results.items():
                pids = [p.pid for k, p in holders if k == kind]
                per_kind[kind]["cpu"].append(sum(used[pid] for pid in pids))
                per_kind[kind]["checks"] += [g["check"] for g in got]
                per_kind[kind]["errors"].update(e for g in got for e in g["errors"])
    rows = []
    for kind, _, count in plan:
        rows.append({
            "label": LABELS.get(kind, "no layer, no receives (floor)"),
            "layer": kind,
            "processes": count,
            "receives": 0 if kind == "floor" else RECEIVES,
            "seconds": duration,
            "cpu_seconds": summary(per_kind[kind]["cpu"]),
            "check": merge_checks(per_kind[kind]["checks"]),
            "errors": sorted(per_kind[kind]["errors"]),
        })
        env.log(_line(rows[-1]))
    if server:
        rows.append({
            "label": "redis-server (for both)",
            "layer": "redis-server",
            "processes": 1,
            "receives": RECEIVES,
            "seconds": duration,
            "cpu_seconds": summary(server),
            "check": None,
        })
        env.log(_line(rows[-1]))
    if late:
        env.log(f"  idle: {late} processes were ready late; their window "
                f"began before they were idle")
    env.backends.cleanup()
    return {"seconds": duration, "receives": RECEIVES, "rows": rows,
            "late_processes": late, "measured_by": "/proc/<pid>/schedstat"}


def _line(row):
    cpu = row["cpu_seconds"]
    check = row["check"]
    tail = f"  lost {check['lost']}" if check else ""
    return (
        f"  idle {row['label']:<24} {row['processes']} proc, "
        f"{row['receives']} receives, {row['seconds']:.0f} s: "
        f"CPU {cpu['median']:.4f} s (min {cpu['min']:.4f}, max {cpu['max']:.4f})"
        f"{tail}"
    )
