"""A damaged segment: every operation works or raises a clear dmb error.

A live segment (channels, queued messages, groups, specific channels, a
receive waiting) is copied byte for byte to a new shared-memory name, the
copy is damaged (bytes flipped, links and counts overwritten, header
fields changed, the file truncated, the lock word forged), and a victim
process attaches a layer to the copy and runs every operation on it.  The
victim runs in a subprocess with a time limit: it must exit normally (no
segfault, no abort, no hang) and every operation must have either worked
or raised a ``dmb.DmbError`` (or ``ChannelFull``) whose message names the
segment.  Anything else is reported as an unclear failure.

Damage to the 40 bytes of the pthread mutex is limited to its lock word:
the rest of a mutex cannot be checked from outside it (docs/reliability.md).

    DMB_DAMAGE_TRIALS=2000 pytest tests/test_hardening_damage.py

runs more trials (default 240).
"""

import asyncio
import collections
import json
import mmap
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import pytest
from channels.exceptions import ChannelFull

from dmb import DmbError, SegmentError, SegmentFull, SharedMemoryChannelLayer
from dmb._ring_cffi import lib
from dmb.segment import LAYOUT_VERSION, segment_name, segment_path, unlink_segment

from conftest import unique_prefix
from hardening_support import is_whole, message

TRIALS = int(os.environ.get("DMB_DAMAGE_TRIALS", "240"))
VICTIMS = 4
SIZE = 1 << 20  # the smallest segment: damage lands densely
LOCK_OFFSET = 128  # offsetof(struct dmb_header, lock)
MUTEX_BYTES = 40
VERSION_OFFSET = 8
BLOCK_SIZE_OFFSET = 12
HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.timeout(120)

GROUPS = ["dmg.g0", "dmg.g1"]
NORMAL = [f"dmg.c{i}" for i in range(6)]


async def populate(layer):
    """Traffic of every kind, left in the segment."""
    specific = [await layer.new_channel() for _ in range(3)]
    for i, channel in enumerate(NORMAL + specific):
        for seq in range(4):
            await layer.send(channel, message(i * 10 + seq, size=100 + 300 * seq))
    for group in GROUPS:
        for channel in NORMAL[:3] + specific[:2]:
            await layer.group_add(group, channel)
        await layer.group_send(group, message(99, size=2000))
    # A receive waiting, so a waiting mask is set in the copy.
    waiting = asyncio.ensure_future(layer.receive("dmg.waiting"))
    await asyncio.sleep(0.01)
    return specific, waiting


@pytest.fixture
def live_segment(make_layer):
    layer = make_layer(size=SIZE)

    async def build():
        specific, waiting = await populate(layer)
        return specific, waiting

    loop = asyncio.new_event_loop()
    specific, waiting = loop.run_until_complete(build())
    handle = layer._h
    tables = {
        "end": handle.end,
        "regions": [
            (handle.off_slots, handle.off_channels, 80),
            (handle.off_channels, handle.off_channel_buckets, 168),
            (handle.off_channel_buckets, handle.off_groups, 4),
            (handle.off_groups, handle.off_group_buckets, 128),
            (handle.off_group_buckets, handle.off_members, 4),
            (handle.off_members, handle.off_member_buckets, 32),
            (handle.off_member_buckets, handle.off_nodes, 4),
            (handle.off_nodes, handle.off_blocks, 24),
            (handle.off_blocks, handle.off_marks, 256),
        ],
        "blocks": handle.geo.blocks,
    }
    yield layer, specific, tables
    waiting.cancel()
    loop.run_until_complete(asyncio.gather(waiting, return_exceptions=True))
    loop.close()


# The damage, done by the victim to its own copy.


def damage(data, kind, rng, tables):
    """Damage a bytearray copy of a segment in one of several ways."""
    if kind == "flips":
        for _ in range(rng.randint(1, 48)):
            off = rng.randrange(tables["end"])
            if LOCK_OFFSET <= off < LOCK_OFFSET + MUTEX_BYTES:
                continue
            data[off] ^= rng.randint(1, 255)
    elif kind == "links":
        for _ in range(rng.randint(1, 12)):
            start, stop, unit = rng.choice(tables["regions"])
            entries = max(1, (stop - start) // unit)
            index = rng.randrange(min(entries, 16) if rng.random() < 0.8 else entries)
            field = rng.randrange(max(1, min(unit, 32) // 4)) * 4
            value = rng.choice(
                [
                    rng.randrange(16),
                    rng.randrange(tables["blocks"] + 2),
                    entries,
                    0xFFFFFFFF,
                    rng.getrandbits(32),
                ]
            )
            struct.pack_into("<I", data, start + index * unit + field, value)
    elif kind == "header":
        for _ in range(rng.randint(1, 4)):
            off = rng.choice([0, 4, 8, 12, 16, 20, 24, 28, 32, 40, 60, 64])
            off = off if rng.random() < 0.5 else rng.randrange(LOCK_OFFSET + 40, 512)
            off -= off % 4
            struct.pack_into("<I", data, off, rng.getrandbits(32))
    elif kind == "lock":
        # A lock word that says "held" by a thread that does not exist,
        # with or without the kernel's owner-died bit.
        struct.pack_into("<I", data, LOCK_OFFSET, rng.choice(LOCK_WORDS))
    elif kind == "truncate":
        cut = rng.choice([0, 1, 100, 511, 512, 4096, len(data) // 2, len(data) - 4096])
        del data[cut:]
    return data


def is_clear(exc, name):
    """A dmb error a user can act on: a segment error names the segment."""
    if isinstance(exc, (SegmentError, SegmentFull)):
        return name in str(exc)
    return isinstance(exc, (DmbError, ChannelFull)) and bool(str(exc))


def run_victim(layer, specific, rng):
    """Every operation, each recorded as ok, a clear error, or unclear."""
    outcomes = []
    name = layer.segment_name

    def record(what, call):
        try:
            result = call()
            # A dict that is not the message sent: payload bytes damaged in
            # the copy, which dmb does not detect (docs/reliability.md).
            altered = isinstance(result, dict) and not is_whole(result)
            outcomes.append((what, "altered" if altered else "ok", repr(result)[:80]))
        except asyncio.TimeoutError:
            outcomes.append((what, "ok", "nothing to receive"))
        except (DmbError, ChannelFull) as exc:
            verdict = "error" if is_clear(exc, name) else "unclear"
            outcomes.append((what, verdict, f"{type(exc).__name__}: {exc}"[:300]))
        except BaseException as exc:  # any other failure is a finding
            outcomes.append((what, "unclear", f"{type(exc).__name__}: {exc}"[:300]))

    def run(coroutine):
        return asyncio.run(asyncio.wait_for(coroutine, 0.01))

    channels = NORMAL + specific + ["dmg.waiting", "dmg.fresh"]
    for channel in rng.sample(channels, len(channels)):
        record(f"receive {channel}", lambda: run(layer.receive(channel)))
        record(f"send {channel}", lambda: run(layer.send(channel, message(7))))
    for group in GROUPS + ["dmg.new"]:
        record(f"group_send {group}", lambda: run(layer.group_send(group, message(8))))
        record(
            f"group_add {group}",
            lambda: run(layer.group_add(group, rng.choice(channels))),
        )
        record(
            f"group_discard {group}",
            lambda: run(layer.group_discard(group, rng.choice(channels))),
        )

    async def round_trip():
        own = await layer.new_channel()
        await layer.send(own, message(9))
        return (await layer.receive(own))["seq"]

    record("new_channel round trip", lambda: run(round_trip()))
    record("flush", lambda: run(layer.flush()))
    record("send after flush", lambda: run(layer.send("dmg.after", message(10))))
    record("receive after flush", lambda: run(layer.receive("dmg.after")))
    record("close", lambda: run(layer.close()))
    return outcomes


def victim_main(spec):
    """Damage copies of the live segment and run a victim on each."""
    lib.dmb_test_lock_patience(spec.get("patience_ms", 300))
    with open(segment_path(spec["source"]), "rb") as f:
        pristine = f.read()
    results = []
    for trial in spec["trials"]:
        rng = random.Random(trial["seed"])
        data = damage(bytearray(pristine), trial["kind"], rng, spec["tables"])
        prefix = trial["prefix"]
        path = segment_path(segment_name(prefix))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)
        started = time.monotonic()
        try:
            layer = SharedMemoryChannelLayer(prefix=prefix, size=SIZE)
        except DmbError as exc:
            verdict = "error" if is_clear(exc, segment_name(prefix)) else "unclear"
            outcomes = [("attach", verdict, f"{type(exc).__name__}: {exc}"[:300])]
        except BaseException as exc:
            outcomes = [("attach", "unclear", f"{type(exc).__name__}: {exc}"[:300])]
        else:
            outcomes = [("attach", "ok", "")]
            outcomes += run_victim(layer, spec["specific"], rng)
        finally:
            unlink_segment(segment_name(prefix))
        results.append(
            {**trial, "outcomes": outcomes, "seconds": time.monotonic() - started}
        )
    print(json.dumps(results))


def start_victim(spec_path):
    return subprocess.Popen(
        [
            sys.executable,
            os.path.join(HERE, "test_hardening_damage.py"),
            "victim",
            spec_path,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


KINDS = ["flips", "links", "header", "flips", "links", "truncate"]
#: Lock words a damaged segment may carry: held by thread 0x1234 (which
#: does not exist), by the largest thread id, and the same with the
#: kernel's owner-died bit (and its waiters bit).
LOCK_WORDS = [0x00001234, 0x3FFFFFFF, 0x40001234, 0xC0001234]


def run_victims(spec, trials, victims=VICTIMS):
    """Run the trials in victim processes; return their reports."""
    running = []
    workdir = tempfile.mkdtemp(prefix="dmb-damage-")
    try:
        for k in range(victims):
            path = os.path.join(workdir, f"victim{k}.json")
            with open(path, "w") as f:
                json.dump({**spec, "trials": trials[k::victims]}, f)
            running.append(start_victim(path))
        reports = []
        for victim in running:
            try:
                out, err = victim.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                victim.kill()
                out, err = victim.communicate()
                pytest.fail(f"a victim hung on a damaged segment:\n{err[-3000:]}")
            assert victim.returncode == 0, (
                f"a victim died (status {victim.returncode}) on a damaged "
                f"segment:\n{err[-3000:]}"
            )
            reports.extend(json.loads(out))
        return reports
    finally:
        for victim in running:
            if victim.poll() is None:
                victim.kill()
        for trial in trials:
            unlink_segment(segment_name(trial["prefix"]))
        shutil.rmtree(workdir, ignore_errors=True)


def unclear_failures(reports):
    return [
        (r["kind"], r["seed"], what, text)
        for r in reports
        for what, verdict, text in r["outcomes"]
        if verdict == "unclear"
    ]


def test_damaged_copies_fail_clearly_or_work(live_segment):
    layer, specific, tables = live_segment
    seeds = random.Random(int(os.environ.get("DMB_DAMAGE_SEED", "424242")))
    trials = [
        {
            "kind": KINDS[i % len(KINDS)],
            "seed": seeds.getrandbits(32),
            "prefix": unique_prefix("dm"),
        }
        for i in range(TRIALS)
    ]
    spec = {"source": layer.segment_name, "specific": specific, "tables": tables}
    reports = run_victims(spec, trials)

    unclear = unclear_failures(reports)
    assert not unclear, "unclear failures:\n" + "\n".join(map(repr, unclear[:20]))
    slowest = max(r["seconds"] for r in reports)
    assert slowest < 20, f"a damaged segment took {slowest:.1f} s"
    summary = {}
    for r in reports:
        verdicts = [verdict for _, verdict, _ in r["outcomes"]]
        key = (r["kind"], "refused" if verdicts[0] == "error" else "attached")
        counts = summary.setdefault(key, [0, 0])
        counts[0] += 1
        counts[1] += verdicts[0] == "ok" and any(
            verdict == "error" and text.startswith("Segment")
            for _, verdict, text in r["outcomes"]
        )
    print("\ndamage trials: (kind, attach) -> trials, of them with a segment error")
    for key in sorted(summary):
        print(f"  {key}: {summary[key][0]}, {summary[key][1]}")
    altered = sum(v == "altered" for r in reports for _, v, _ in r["outcomes"])
    print(f"  messages delivered with damaged payload bytes: {altered}")
    if os.environ.get("DMB_DAMAGE_SHOW"):
        texts = collections.Counter(
            text.split(":")[0] + ": " + text.split(": ", 2)[-1][:90]
            for r in reports
            for _, verdict, text in r["outcomes"]
            if verdict == "error" and not text.startswith("ForeignChannel")
        )
        for text, count in texts.most_common(15):
            print(f"  {count:5d}  {text}")
    # The live segment the copies came from is untouched.
    assert lib.dmb_repair(layer._h) == 0


def test_forged_lock_word_fails_clearly_or_is_repaired(live_segment):
    """A lock word damaged into "held": an operation waits out the lock's
    patience and fails with a clear error; one carrying the owner-died bit
    is repaired as after a real death, and everything works."""
    layer, specific, tables = live_segment
    trials = [
        {"kind": "lock", "seed": seed, "prefix": unique_prefix("dl")}
        for seed in range(8)
    ]
    spec = {
        "source": layer.segment_name,
        "specific": specific,
        "tables": tables,
        "patience_ms": 100,
    }
    reports = run_victims(spec, trials, victims=2)
    assert not unclear_failures(reports)
    for r in reports:
        word = random.Random(r["seed"]).choice(LOCK_WORDS)
        attach, verdict, text = r["outcomes"][0]
        if word & 0x40000000:  # owner died: repaired
            failed = [
                text
                for _, verdict, text in r["outcomes"]
                if verdict != "ok" and not text.startswith("ForeignChannel")
            ]
            assert not failed, failed
        else:
            assert verdict == "error" and "has been held for over" in text, r


# A segment of another layout version.


def rewrite_header(name, offset, value):
    with open(segment_path(name), "r+b") as f:
        with mmap.mmap(f.fileno(), 4096) as view:
            struct.pack_into("<I", view, offset, value)


def test_other_layout_version_is_refused_with_how_to_remove(make_layer, prefix):
    layer = make_layer()
    name = layer.segment_name
    layer.close_sync()
    rewrite_header(name, VERSION_OFFSET, LAYOUT_VERSION + 1)
    with pytest.raises(SegmentError) as raised:
        make_layer()
    text = str(raised.value)
    assert f"layout version {LAYOUT_VERSION + 1}" in text
    assert f"uses {LAYOUT_VERSION}" in text
    assert "python -m dmb.inspect --unlink" in text and name in text
    assert f"rm {segment_path(name)}" in text


def test_other_block_size_is_refused_with_how_to_remove(make_layer):
    layer = make_layer()
    name = layer.segment_name
    layer.close_sync()
    rewrite_header(name, BLOCK_SIZE_OFFSET, 512)
    with pytest.raises(SegmentError, match="block size") as raised:
        make_layer()
    assert "python -m dmb.inspect --unlink" in str(raised.value)


def test_foreign_object_is_refused_with_how_to_remove(make_layer, prefix):
    name = segment_name(prefix)
    with open(segment_path(name), "wb") as f:
        f.write(b"not a dmb segment" * 100000)
    with pytest.raises(SegmentError, match="not a dmb segment") as raised:
        make_layer()
    assert f"rm {segment_path(name)}" in str(raised.value)


def test_truncated_segment_is_refused(make_layer, prefix):
    layer = make_layer()
    name = layer.segment_name
    layer.close_sync()
    os.truncate(segment_path(name), os.path.getsize(segment_path(name)) // 2)
    with pytest.raises(SegmentError, match="truncated") as raised:
        make_layer()
    assert name in str(raised.value)


if __name__ == "__main__":
    if sys.argv[1] == "victim":
        with open(sys.argv[2]) as spec_file:
            victim_main(json.load(spec_file))
