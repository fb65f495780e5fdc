"""Round trip: ping from one process, echo from another, one at a time.

Each process receives on its own ``new_channel()``.  The pinger sends a
100 B message to the echo's channel and waits for it to come back on its
own; every round trip is timed, and p50/p99/p99.9 are taken per repeat.

The floor is the same exchange over two plain pipes between two asyncio
processes (``connect_read_pipe``/``connect_write_pipe``, a protocol that
hands 100-byte records to a waiting coroutine): what any layer that wakes
an asyncio receiver in another process must at least pay.
"""

import asyncio
import struct
import time

from .harness import LABELS, cpu_seconds, message, payload_of, workers
from .stats import SeqCheck, merge_checks, percentile, summary

SIZE = 100
RECORD = struct.Struct("<q92x")  # a 100-byte record carrying a sequence number


async def setup(ctx):
    ctx.state["channel"] = await ctx.layer.new_channel()
    return ctx.state["channel"]


async def _echo_all(layer, mine, reply_to, count, check):
    for _ in range(count):
        msg = await layer.receive(mine)
        check.see(msg["seq"])
        await layer.send(reply_to, msg)


async def echo(ctx, reply_to, count, timeout, profile=False):
    check = SeqCheck()
    profiler = _profiler(profile)
    ctx.signal("ready")
    cpu = cpu_seconds()
    try:
        await asyncio.wait_for(
            _echo_all(ctx.layer, ctx.state["channel"], reply_to, count, check),
            timeout,
        )
    except asyncio.TimeoutError:
        pass
    return {
        "check": check.result(count),
        "cpu": cpu_seconds() - cpu,
        "profile": _profile_text(profiler),
    }


async def _ping_all(layer, mine, target, count, warmup, check):
    payload = payload_of(SIZE)
    samples = []
    clock = time.perf_counter_ns
    for seq in range(count + warmup):
        t = clock()
        await layer.send(target, message(seq, payload))
        got = await layer.receive(mine)
        dt = clock() - t
        check.see(got["seq"])
        if seq >= warmup:
            samples.append(dt)
    return samples


async def ping(ctx, target, count, warmup, timeout):
    check = SeqCheck()
    cpu = cpu_seconds()
    try:
        samples = await asyncio.wait_for(
            _ping_all(ctx.layer, ctx.state["channel"], target, count, warmup, check),
            timeout,
        )
    except asyncio.TimeoutError:
        samples = []
    return {
        "latency": _percentiles(samples),
        "check": check.result(count + warmup),
        "cpu": cpu_seconds() - cpu,
    }


async def one_process(ctx, count, warmup, timeout):
    layer = ctx.layer
    a, b = await layer.new_channel(), await layer.new_channel()
    echo_check, ping_check = SeqCheck(), SeqCheck()
    cpu = cpu_seconds()
    echoer = asyncio.ensure_future(_echo_all(layer, b, a, count + warmup, echo_check))
    try:
        samples = await asyncio.wait_for(
            _ping_all(layer, a, b, count, warmup, ping_check), timeout
        )
        await echoer
    except asyncio.TimeoutError:
        samples = []
        echoer.cancel()
    return {
        "latency": _percentiles(samples),
        "check": merge_checks(
            [ping_check.result(count + warmup), echo_check.result(count + warmup)]
        ),
        "cpu": cpu_seconds() - cpu,
        "trips": count + warmup,
    }


def _percentiles(samples):
    samples.sort()
    return {
        "n": len(samples),
        "p50": percentile(samples, 50),
        "p99": percentile(samples, 99),
        "p99.9": percentile(samples, 99.9),
        "mean": sum(samples) / len(samples) if samples else None,
    }


def _profiler(enabled):
    if not enabled:
        return None
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def _profile_text(profiler, limit=18):
    if profiler is None:
        return None
    import io
    import pstats

    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(limit)
    return out.getvalue()


# The floor: two pipes between two asyncio processes.


class _Records(asyncio.Protocol):
    """Hands fixed-size records to one waiting coroutine."""

    def __init__(self):
        self.buffer = bytearray()
        self.waiter = None

    def data_received(self, data):
        self.buffer += data
        if self.waiter is not None and len(self.buffer) >= RECORD.size:
            waiter, self.waiter = self.waiter, None
            if not waiter.done():
                waiter.set_result(None)

    async def read(self):
        while len(self.buffer) < RECORD.size:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        record = bytes(self.buffer[: RECORD.size])
        del self.buffer[: RECORD.size]
        return record


async def _pipes(ctx):
    if "pipes" not in ctx.state:
        loop = asyncio.get_running_loop()
        read_conn, write_conn = ctx.extra
        reader = open(read_conn.fileno(), "rb", buffering=0, closefd=False)
        writer = open(write_conn.fileno(), "wb", buffering=0, closefd=False)
        _, records = await loop.connect_read_pipe(_Records, reader)
        transport, _ = await loop.connect_write_pipe(asyncio.Protocol, writer)
        ctx.state["pipes"] = (records, transport)
    return ctx.state["pipes"]


async def pipe_echo(ctx, count, timeout):
    records, transport = await _pipes(ctx)
    check = SeqCheck()
    ctx.signal("ready")
    cpu = cpu_seconds()

    async def run():
        for _ in range(count):
            record = await records.read()
            check.see(RECORD.unpack(record)[0])
            transport.write(record)

    try:
        await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        pass
    return {"check": check.result(count), "cpu": cpu_seconds() - cpu}


async def pipe_ping(ctx, count, warmup, timeout):
    records, transport = await _pipes(ctx)
    check = SeqCheck()
    clock = time.perf_counter_ns
    cpu = cpu_seconds()

    async def run():
        samples = []
        for seq in range(count + warmup):
            t = clock()
            transport.write(RECORD.pack(seq))
            record = await records.read()
            dt = clock() - t
            check.see(RECORD.unpack(record)[0])
            if seq >= warmup:
                samples.append(dt)
        return samples

    try:
        samples = await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        samples = []
    return {
        "latency": _percentiles(samples),
        "check": check.result(count + warmup),
        "cpu": cpu_seconds() - cpu,
    }


# Orchestration.


def _row(kind, processes, rounds):
    row = {"label": LABELS[kind], "layer": kind, "processes": processes}
    for key in ("p50", "p99", "p99.9", "mean"):
        row[key] = summary([r["latency"][key] for r in rounds])
    row["samples"] = sum(r["latency"]["n"] for r in rounds)
    # CPU of both processes per round trip (warm-up trips included).
    row["cpu_us_per_trip"] = summary([r["cpu"] / r["trips"] * 1e6 for r in rounds])
    row["check"] = merge_checks(r["check"] for r in rounds)
    return row


def _pair_round(pinger, echoer, a, b, count, warmup, pipe=False):
    """One timed repeat between a pinger and an echo worker."""
    if pipe:
        echoer.start(pipe_echo, count=count + warmup, timeout=300)
    else:
        echoer.start(echo, reply_to=a, count=count + warmup, timeout=300)
    echoer.expect("ready")
    if pipe:
        got = pinger.call(pipe_ping, count=count, warmup=warmup, timeout=300)
    else:
        got = pinger.call(ping, target=b, count=count, warmup=warmup,
                          timeout=300)
    echoed = echoer.expect("result")
    got["check"] = merge_checks([got["check"], echoed["check"]])
    got["cpu"] += echoed["cpu"]
    got["trips"] = count + warmup
    return got


def run(env):
    """Every layer's workers start first; then each repeat runs every layer
    in turn, so that a change in the machine's state (load, how fast an
    idle CPU wakes) falls on all of them alike."""
    from .harness import SPAWN

    count = env.pick(10_000, 2_000, 100)
    warmup = env.pick(500, 200, 20)
    env.flush_redis()
    kinds = [k for k in ("dmb", "redis", "pubsub") if env.wants(k)]
    specs = []
    for kind in kinds:
        spec = env.backends.spec(kind)  # one spec: one segment for the pair
        specs += [(spec, f"{kind}-ping"), (spec, f"{kind}-echo")]
    pipe_spec = env.backends.spec("pipe")
    ab_read, ab_write = SPAWN.Pipe(duplex=False)
    ba_read, ba_write = SPAWN.Pipe(duplex=False)
    names = specs + [(pipe_spec, "pipe-ping"), (pipe_spec, "pipe-echo")]
    extras = [None] * len(specs) + [(ba_read, ab_write), (ab_read, ba_write)]
    if env.wants("inmemory"):
        names.append((env.backends.spec("inmemory"), "one-process"))
        extras.append(None)
    rounds = {k: [] for k in kinds + ["pipe", "inmemory"]}
    profile = None
    with workers(names, extras=extras) as procs:
        for conn in (ab_read, ab_write, ba_read, ba_write):
            conn.close()
        pairs = {}
        for i, kind in enumerate(kinds):
            pinger, echoer = procs[2 * i], procs[2 * i + 1]
            pairs[kind] = (pinger, echoer, pinger.call(setup), echoer.call(setup))
        pipe_pair = procs[2 * len(kinds)], procs[2 * len(kinds) + 1]
        one = procs[-1] if env.wants("inmemory") else None
        for _ in range(env.repeats):
            for kind in kinds:
                pinger, echoer, a, b = pairs[kind]
                rounds[kind].append(
                    _pair_round(pinger, echoer, a, b, count, warmup)
                )
            rounds["pipe"].append(
                _pair_round(*pipe_pair, None, None, count, warmup, pipe=True)
            )
            if one is not None:
                rounds["inmemory"].append(
                    one.call(one_process, count=count, warmup=warmup, timeout=300)
                )
        if "dmb" in pairs:
            # One more round with the echo side under cProfile.
            pinger, echoer, a, b = pairs["dmb"]
            echoer.start(echo, reply_to=a, count=count // 2 + warmup,
                         timeout=300, profile=True)
            echoer.expect("ready")
            pinger.call(ping, target=b, count=count // 2, warmup=warmup,
                        timeout=300)
            profile = echoer.expect("result")["profile"]
    rows = []
    for kind in kinds + ["inmemory", "pipe"]:
        if rounds[kind]:
            rows.append(_row(kind, 1 if kind == "inmemory" else 2, rounds[kind]))
            env.log(_line(rows[-1]))
    # Paired ratios: dmb over each other row, repeat by repeat.
    paired = {}
    for kind in ("redis", "pipe"):
        if rounds.get("dmb") and rounds.get(kind):
            for key in ("p50", "p99"):
                paired[f"{key} dmb/{kind}"] = summary([
                    d["latency"][key] / o["latency"][key]
                    for d, o in zip(rounds["dmb"], rounds[kind])
                ])
    env.backends.cleanup()
    return {"size": SIZE, "count": count, "rows": rows, "paired": paired,
            "dmb_echo_profile": profile}


def _line(row):
    def us(key):
        s = row[key]
        return f"{s['median'] / 1000:8.1f}" if s else "     n/a"

    return (
        f"  round trip {row['label']:<24} {row['processes']} proc  p50 {us('p50')} "
        f"p99 {us('p99')} p99.9 {us('p99.9')} us  cpu/trip "
        f"{row['cpu_us_per_trip']['median']:6.1f} us  lost {row['check']['lost']} "
        f"reordered {row['check']['reordered']}"
    )
