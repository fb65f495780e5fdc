"""Where dmb's time goes: send, receive and group_send, part by part.

Two views, both in one worker process on dmb's Channels API:

* the parts timed alone, each in a tight loop (name validation, msgpack
  packing and the sender's check, the C call through cffi, unpacking),
  beside the whole call;
* cProfile of each call in a loop, the top functions by own time.

The waiting receive (a receive that has to wait for another process) is
profiled in the round-trip scenario, on the echo side.
"""

import asyncio
import cProfile
import io
import os
import pstats
import re
import time

from .harness import message, payload_of, workers

GROUP = "bench.profile"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _per_call(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def _per_call_async(loop, make, n):
    async def run():
        t0 = time.perf_counter()
        for _ in range(n):
            await make()
        return (time.perf_counter() - t0) / n * 1e6

    return loop.run_until_complete(run())


def _profile(loop, make, n, limit=14):
    async def run():
        for _ in range(n):
            await make()

    profiler = cProfile.Profile()
    profiler.enable()
    loop.run_until_complete(run())
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(limit)
    total = stats.total_tt
    return {"text": _trim(out.getvalue()), "total_s": total}


_PATH = re.compile(r"\S*/(?:site-packages|lib/python3\.\d+)/|" + re.escape(ROOT + "/"))


def _trim(text):
    """Drop pstats' preamble and shorten paths to the package."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("ncalls"):
            lines = lines[i:]
            break
    out = []
    for line in lines:
        fields = _PATH.sub("", line).split(None, 5)
        if fields and fields[0] == "ncalls":
            out.append(f"{'ncalls':>9} {'tottime':>8} {'cumtime':>8}  function")
        elif len(fields) == 6:
            ncalls, tottime, _, cumtime, _, where = fields
            out.append(f"{ncalls:>9} {tottime:>8} {cumtime:>8}  {where}")
        elif len(fields) == 4:
            out.append(line.rstrip())  # trimmed already
    return "\n".join(out)


def parts(ctx, n, members):
    import msgpack
    from dmb._ring_cffi import ffi, lib

    layer = ctx.layer
    loop = asyncio.new_event_loop()
    name = "bench.profile.one"
    bname = name.encode()
    msg = message(1, payload_of(100))
    data = layer._pack(msg)
    wake = ffi.new("struct dmb_wake *")
    buf = ffi.new("char[]", 65536)
    length = ffi.new("uint32_t *")
    n_small = n
    for i in range(members):
        layer.group_add_sync(GROUP, f"bench.profile.m{i}")

    def drain_one():
        lib.dmb_recv(layer._h, layer._slot, bname, len(bname), 100,
                     time.monotonic_ns(), 0, buf, 65536, length)

    def c_send():
        now = time.monotonic_ns()
        lib.dmb_send(layer._h, layer._slot, bname, len(bname), 100, data,
                     len(data), now, now + 60 * 10**9, wake)
        drain_one()

    def c_pair():
        now = time.monotonic_ns()
        lib.dmb_send(layer._h, layer._slot, bname, len(bname), 100, data,
                     len(data), now, now + 60 * 10**9, wake)
        lib.dmb_recv(layer._h, layer._slot, bname, len(bname), 100, now, 0,
                     buf, 65536, length)

    def send_then_drain():
        layer.send_sync(name, msg)
        drain_one()

    async def send_async():
        await layer.send(name, msg)
        drain_one()

    async def pair_async():
        await layer.send(name, msg)
        await layer.receive(name)

    gname = GROUP.encode()
    full = ffi.new("uint32_t *")
    nospace = ffi.new("uint32_t *")

    def purge_members():
        for i in range(members):
            m = f"bench.profile.m{i}".encode()
            lib.dmb_purge(layer._h, m, len(m))

    def c_group_send():
        now = time.monotonic_ns()
        lib.dmb_group_send(layer._h, gname, len(gname), data, len(data), now,
                           now + 60 * 10**9, 86400 * 10**9, full, nospace, wake)

    async def group_send_async():
        await layer.group_send(GROUP, msg)

    packed = msgpack.packb(msg, use_bin_type=True)
    rows = {
        "send": [
            ("require_valid_channel_name", _per_call(
                lambda: layer.require_valid_channel_name(name), n_small)),
            ("msgpack pack", _per_call(
                lambda: msgpack.packb(msg, use_bin_type=True), n_small)),
            ("sender's check (unpack, strict keys)", _per_call(
                lambda: msgpack.unpackb(packed, raw=False, strict_map_key=True),
                n_small)),
            ("layer._pack (both)", _per_call(lambda: layer._pack(msg), n_small)),
            ("time.monotonic_ns", _per_call(time.monotonic_ns, n_small)),
            ("C dmb_send + dmb_recv via cffi", _per_call(c_pair, n_small)),
            ("send_sync (+ a C receive)", _per_call(send_then_drain, n_small)),
            ("await send (+ a C receive)", _per_call_async(loop, send_async,
                                                          n_small)),
        ],
        "receive": [
            ("msgpack unpack", _per_call(
                lambda: msgpack.unpackb(packed, raw=False, strict_map_key=False),
                n_small)),
            ("await send + await receive", _per_call_async(loop, pair_async,
                                                           n_small)),
        ],
        "group_send": [],
    }
    # group_send to `members` channels, purged every 100 calls.
    calls = max(100, n // members * 10)

    def timed_group(fn_async=None, fn_sync=None):
        total = 0.0
        done = 0
        while done < calls:
            batch = min(100, calls - done)
            if fn_async:
                total += _per_call_async(loop, fn_async, batch) * batch
            else:
                total += _per_call(fn_sync, batch) * batch
            purge_members()
            done += batch
        return total / calls

    # A 256 KiB message: the copies dominate.
    big = message(1, payload_of(256 * 1024))
    big_packed = msgpack.packb(big, use_bin_type=True)
    big_buf = ffi.new("char[]", len(big_packed) + 1024)
    big_name = b"bench.profile.big"

    def c_big_pair():
        now = time.monotonic_ns()
        lib.dmb_send(layer._h, layer._slot, big_name, len(big_name), 100,
                     big_packed, len(big_packed), now, now + 60 * 10**9, wake)
        lib.dmb_recv(layer._h, layer._slot, big_name, len(big_name), 100, now,
                     0, big_buf, len(big_packed) + 1024, length)

    async def big_pair():
        await layer.send("bench.profile.big", big)
        await layer.receive("bench.profile.big")

    n_big = max(20, n // 100)
    rows["256 KiB message"] = [
        ("msgpack pack", _per_call(
            lambda: msgpack.packb(big, use_bin_type=True), n_big)),
        ("sender's check (unpack, strict keys)", _per_call(
            lambda: msgpack.unpackb(big_packed, raw=False, strict_map_key=True),
            n_big)),
        ("C dmb_send + dmb_recv via cffi", _per_call(c_big_pair, n_big)),
        ("msgpack unpack from the receive buffer", _per_call(
            lambda: msgpack.unpackb(ffi.buffer(big_buf, len(big_packed)),
                                    raw=False, strict_map_key=False), n_big)),
        ("await send + await receive", _per_call_async(loop, big_pair, n_big)),
    ]
    rows["group_send"] = [
        (f"C dmb_group_send via cffi ({members} members)",
         timed_group(fn_sync=c_group_send)),
        (f"await group_send ({members} members)",
         timed_group(fn_async=group_send_async)),
    ]
    profiles = {
        "send": _profile(loop, send_async, n_small),
        "send+receive": _profile(loop, pair_async, n_small),
    }
    prof = cProfile.Profile()
    prof.enable()
    timed_group(fn_async=group_send_async)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(14)
    profiles["group_send"] = {"text": _trim(out.getvalue()),
                              "total_s": stats.total_tt}
    loop.close()
    return {
        "parts_us": {k: [[label, us] for label, us in v] for k, v in rows.items()},
        "profiles": profiles,
        "members": members,
    }


def run(env):
    spec = env.backends.spec("dmb", capacity=100_000)
    n = env.pick(50_000, 10_000, 300)
    with workers([(spec, "profile")]) as (w,):
        got = w.call(parts, n=n, members=100)
    for section, rows in got["parts_us"].items():
        for label, us in rows:
            env.log(f"  profile {section:<10} {label:<42} {us:8.2f} us")
    env.backends.cleanup()
    got["check"] = None
    return got
