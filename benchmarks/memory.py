"""Memory: segment bytes per idle channel and membership, and process RSS.

Segment cost comes from the layout the C core computes (``dmb_stats``
geometry and the table offsets in the handle): every table is made when
the segment is, so an idle channel costs its table entry, its hash bucket
and its repair mark, and nothing in the message store.  The harness
checks that last part: it makes 1,000 idle channels (receives waiting on
them) and 1,000 memberships and reads the usage counts before and after.

RSS: a fresh interpreter reads VmRSS (and its parts) from
/proc/self/status at each step: start, ``import channels.layers`` (what
any Channels process has), ``import dmb``, building the layer (attaching
to a segment that exists), one send and receive.  A second probe imports
dmb into a bare interpreter, and a third is the process that creates
(and so formats, touching every page of) the segment.
"""

import asyncio
import json
import os
import subprocess
import sys

from .harness import workers
from .stats import summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDLE = 1000
PROBE_SIZE = 32 * 1024 * 1024  # dmb's default size


async def segment_costs(ctx):
    from dmb._ring_cffi import ffi, lib

    layer = ctx.layer
    h = layer._h
    geo = h.geo

    def per_entry(start, end, count):
        return (end - start) / count

    channel = (
        per_entry(h.off_channels, h.off_channel_buckets, geo.channels)
        + per_entry(h.off_channel_buckets, h.off_groups, geo.channels)
        + 1  # repair mark
    )
    membership = (
        per_entry(h.off_members, h.off_member_buckets, geo.members)
        + per_entry(h.off_member_buckets, h.off_nodes, geo.members)
        + 1
    )
    group = (
        per_entry(h.off_groups, h.off_group_buckets, geo.groups)
        + per_entry(h.off_group_buckets, h.off_members, geo.groups)
        + 1
    )

    def usage():
        stats = ffi.new("struct dmb_stats *")
        lib.dmb_stats(h, stats)
        return {
            "channels": stats.used_channels,
            "groups": stats.used_groups,
            "members": stats.used_members,
            "nodes": stats.used_nodes,
            "blocks": stats.used_blocks,
        }

    before = usage()
    names = [await layer.new_channel() for _ in range(IDLE)]
    tasks = [asyncio.ensure_future(layer.receive(name)) for name in names]
    await asyncio.sleep(0.05)
    with_channels = usage()
    for name in names:
        await layer.group_add("bench.memory", name)
    with_members = usage()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for name in names:
        await layer.group_discard("bench.memory", name)
    after = usage()
    stats = ffi.new("struct dmb_stats *")
    lib.dmb_stats(h, stats)
    return {
        "size": stats.size,
        "geometry": {
            "channels": geo.channels,
            "groups": geo.groups,
            "members": geo.members,
            "nodes": geo.nodes,
            "blocks": geo.blocks,
        },
        "bytes_per_channel_entry": channel,
        "bytes_per_membership_entry": membership,
        "bytes_per_group_entry": group,
        "segment_per_channel_of_size": stats.size / geo.channels,
        "usage_before": before,
        "usage_idle_channels": with_channels,
        "usage_memberships": with_members,
        "usage_after": after,
    }


def probe(mode, prefix, size):
    """Run memprobe in a fresh interpreter; return its stages."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memprobe", mode, prefix, str(size)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=120,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(env):
    from dmb.segment import segment_name, unlink_segment

    spec = env.backends.spec("dmb", size=PROBE_SIZE)
    prefix = spec["config"]["prefix"]
    with workers([(spec, "memory")]) as (w,):
        costs = w.call(segment_costs)
        # The segment exists now (the worker made it): probes attach.
        probes = {"attach": [], "bare": []}
        for _ in range(env.repeats):
            probes["attach"].append(probe("attach", prefix, PROBE_SIZE))
            probes["bare"].append(probe("bare", prefix, PROBE_SIZE))
    create_prefix = env.backends.new_prefix()
    probes["create"] = []
    for _ in range(env.repeats):
        probes["create"].append(probe("attach", create_prefix, PROBE_SIZE))
        unlink_segment(segment_name(create_prefix))
    rss = {}
    for mode, runs in probes.items():
        steps = [step for step, _ in runs[0]]
        rss[mode] = []
        for i, step in enumerate(steps):
            entry = {"step": step}
            for field in runs[0][i][1]:
                entry[field] = summary([r[i][1][field] for r in runs])
            rss[mode].append(entry)
    added = {
        mode: summary([_added(r) for r in runs]) for mode, runs in probes.items()
    }
    idle = costs["usage_idle_channels"]
    base = costs["usage_before"]
    check_ok = (
        idle["channels"] - base["channels"] == IDLE
        and idle["nodes"] == base["nodes"]
        and idle["blocks"] == base["blocks"]
    )
    env.log(
        f"  memory: {costs['bytes_per_channel_entry']:.0f} B per idle channel, "
        f"{costs['bytes_per_membership_entry']:.0f} B per membership; idle "
        f"channels use no store: {check_ok}"
    )
    for mode, s in added.items():
        env.log(f"  memory: RSS added ({mode}): {s['median'] / 1024:.1f} MiB")
    env.backends.cleanup()
    return {
        "segment": costs,
        "idle_channels_use_no_store": check_ok,
        "rss": rss,
        "rss_added_kib": added,
        "check": {"sent": 0, "received": 0, "lost": 0 if check_ok else 1,
                  "reordered": 0},
    }


def _added(stages):
    """VmRSS added from the step before ``import dmb`` to after attaching."""
    names = [step for step, _ in stages]
    before = stages[names.index("import dmb") - 1][1]["VmRSS"]
    after = stages[names.index("attached")][1]["VmRSS"]
    return after - before
