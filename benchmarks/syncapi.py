"""group_send from sync code: what a Django view or a Celery task pays.

A sender process with no event loop running calls, in a tight loop:

* ``async_to_sync(noop)()`` for an empty coroutine: the floor, what
  asgiref alone costs per call (a fresh event loop in a worker thread);
* ``async_to_sync(layer.group_send)(group, message)`` for each layer;
* ``layer.group_send_sync(group, message)``, dmb's native sync twin.

A receiver process holds the group's one member (a ``new_channel()``
consumer) and checks that every message arrived, in order.
"""

import asyncio
import time

from asgiref.sync import async_to_sync

from .harness import LABELS, message, payload_of, workers
from .stats import SeqCheck, merge_checks, summary

GROUP = "bench.sync"
SIZE = 100


async def setup_receiver(ctx):
    channel = await ctx.layer.new_channel()
    await ctx.layer.group_add(GROUP, channel)
    ctx.state["channel"] = channel
    return channel


async def receive(ctx, count, timeout):
    layer, channel = ctx.layer, ctx.state["channel"]
    check = SeqCheck()
    ctx.signal("ready")

    async def run():
        for _ in range(count):
            check.see((await layer.receive(channel))["seq"])

    try:
        await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        pass
    return {"check": check.result(count)}


async def _noop():
    return None


def interleaved(ctx, count, start, block=50):
    """Empty calls and group_send calls, in alternating blocks.

    Load that comes and goes while this runs hits both alike, so their
    ratio holds even on a busy machine.  Returns both rates.
    """
    empty = async_to_sync(_noop)
    send = async_to_sync(ctx.layer.group_send)
    payload = payload_of(SIZE)
    clock = time.perf_counter
    spent = {"empty": 0.0, "group_send": 0.0}
    seq = start
    done = 0
    while done < count:
        n = min(block, count - done)
        t0 = clock()
        for _ in range(n):
            empty()
        t1 = clock()
        for _ in range(n):
            send(GROUP, message(seq, payload))
            seq += 1
        t2 = clock()
        spent["empty"] += t1 - t0
        spent["group_send"] += t2 - t1
        done += n
    return {key: count / value for key, value in spent.items()}


def native(ctx, count, start):
    send = ctx.layer.group_send_sync
    payload = payload_of(SIZE)
    t0 = time.perf_counter()
    for seq in range(start, start + count):
        send(GROUP, message(seq, payload))
    return count / (time.perf_counter() - t0)


def run(env):
    rows = []
    count = env.pick(3_000, 1_000, 50)
    native_count = env.pick(50_000, 10_000, 200)
    for kind in ("dmb", "redis", "pubsub"):
        if not env.wants(kind):
            continue
        env.flush_redis()
        spec = env.backends.spec(kind, capacity=count + native_count + 10)
        with workers([(spec, "sync-sender"), (spec, "receiver")]) as (snd, rcv):
            rcv.call(setup_receiver)
            empties, sends, natives, checks = [], [], [], []
            # One warm-up round, then the repeats.
            for repeat in range(env.repeats + 1):
                total = count + (native_count if kind == "dmb" else 0)
                rcv.start(receive, count=total, timeout=300)
                rcv.expect("ready")
                both = snd.call(interleaved, count=count, start=0)
                e, g = both["empty"], both["group_send"]
                n = None
                if kind == "dmb":
                    n = snd.call(native, count=native_count, start=count)
                checks.append(rcv.expect("result")["check"])
                if repeat:
                    empties.append(e)
                    sends.append(g)
                    natives.append(n)
        rows.append({
            "label": LABELS[kind],
            "layer": kind,
            "count": count,
            "empty_async_to_sync_per_s": summary(empties),
            "async_to_sync_group_send_per_s": summary(sends),
            "ratio_to_empty": summary([g / e for g, e in zip(sends, empties)]),
            "native_group_send_sync_per_s": summary(natives),
            "native_count": native_count if kind == "dmb" else None,
            "check": merge_checks(checks),
        })
        env.log(_line(rows[-1]))
    env.backends.cleanup()
    return {"size": SIZE, "rows": rows}


def _line(row):
    def rate(key):
        s = row[key]
        return f"{s['median']:,.0f}/s" if s else "-"

    return (
        f"  sync {row['label']:<24} empty async_to_sync "
        f"{rate('empty_async_to_sync_per_s'):>10}  async_to_sync(group_send) "
        f"{rate('async_to_sync_group_send_per_s'):>10}  native "
        f"{rate('native_group_send_sync_per_s'):>10}  lost {row['check']['lost']} "
        f"reordered {row['check']['reordered']}"
    )
