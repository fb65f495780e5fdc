"""Memory limits: a full segment, a small /dev/shm, full tables.

Each limit is a clear error at the call that meets it, naming the segment,
what fills it and the option to raise; nothing half-written stays behind,
and the layer works again once there is room.
"""

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from channels.exceptions import ChannelFull

from dmb import SegmentFull
from dmb._ring_cffi import ffi, lib
from dmb.segment import process_start_time

from hardening_support import handle_of, identity_holds, is_whole, message, stats

pytestmark = pytest.mark.timeout(60)

SMALL = 1 << 20  # the smallest segment
BIG = 200_000  # bytes of blob: a few fill the store


def fill_store(layer, prefix="full"):
    """Send big messages to fresh channels until the store is full."""
    for n in range(1000):
        try:
            layer.send_sync(f"{prefix}.{n}", message(n, size=BIG))
        except SegmentFull as exc:
            return n, exc
    raise AssertionError("the store never filled")


def test_full_segment_refuses_send_with_a_clear_error(make_layer):
    layer = make_layer(size=SMALL, capacity=1000)
    handle = handle_of(layer)
    sent, error = fill_store(layer)
    assert sent >= 2
    assert isinstance(error, ChannelFull)
    text = str(error)
    assert layer.segment_name in text
    assert "queued messages" in text and "bytes" in text  # what uses it
    assert "CONFIG size" in text  # which option to raise
    before = stats(handle)
    with pytest.raises(SegmentFull):
        layer.send_sync("full.again", message(1, size=BIG))
    after = stats(handle)
    assert after["queued"] == before["queued"]  # nothing half-written
    assert after["used_blocks"] == before["used_blocks"]
    assert after["refused_nospace"] > before["refused_nospace"]
    # A small message still fits in what is left, and draining makes room.
    layer.send_sync("full.small", message(2, size=10))

    async def drain():
        for n in range(sent):
            assert is_whole(await layer.receive(f"full.{n}"))

    asyncio.run(drain())
    layer.send_sync("full.again", message(3, size=BIG))
    assert identity_holds(stats(handle))


def test_full_segment_skips_group_members_and_says_so(make_layer, caplog):
    layer = make_layer(size=SMALL, capacity=1000)
    layer.group_add_sync("room", "room.a")
    layer.group_add_sync("room", "room.b")
    fill_store(layer)
    handle = handle_of(layer)
    before = stats(handle)
    with caplog.at_level(logging.INFO, logger="dmb.layer"):
        layer.group_send_sync("room", message(9, size=BIG))
    after = stats(handle)
    assert after["dropped_full"] == before["dropped_full"] + 2
    assert after["sent"] == before["sent"] + 2
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning, caplog.text
    text = warning[0].getMessage()
    assert layer.segment_name in text and "CONFIG size" in text
    assert identity_holds(after)


def test_process_table_full_is_a_clear_error(make_layer):
    layer = make_layer()
    handle = handle_of(layer)
    me, started = os.getpid(), process_start_time(os.getpid())
    taken = []
    while True:
        slot = lib.dmb_slot_acquire(
            handle, me, started, 1000 + len(taken), b"filler", 6, time.monotonic_ns()
        )
        if slot < 0:
            assert slot == lib.DMB_ERR_SLOTS
            break
        taken.append(slot)
    assert len(taken) + 1 == lib.DMB_MAX_SLOTS == 128
    with pytest.raises(SegmentFull) as raised:
        make_layer()
    text = str(raised.value)
    assert "no free process slot" in text and "128" in text
    assert layer.segment_name in text and "python -m dmb.inspect" in text
    for slot in taken:
        info = _slot_gen(handle, slot)
        assert lib.dmb_slot_release(handle, slot, info) == 0
    make_layer()  # room again


def _slot_gen(handle, slot):
    info = ffi.new("struct dmb_slot_info *")
    lib.dmb_slot_info(handle, slot, info)
    return info.gen


def geometry(layer):
    out = ffi.new("struct dmb_stats *")
    lib.dmb_stats(handle_of(layer), out)
    return out.geometry


def test_channel_table_full_is_a_clear_error(make_layer):
    layer = make_layer(size=SMALL)
    limit = geometry(layer).channels
    for n in range(limit):
        layer.send_sync(f"many.{n}", {"n": n})
    with pytest.raises(SegmentFull) as raised:
        layer.send_sync("many.last", {"n": -1})
    text = str(raised.value)
    assert f"all {limit} channel entries are in use" in text
    assert layer.segment_name in text and "CONFIG size" in text
    asyncio.run(layer.receive("many.0"))  # frees its entry
    layer.send_sync("many.last", {"n": -1})


def test_group_table_full_is_a_clear_error(make_layer):
    layer = make_layer(size=SMALL)
    limit = geometry(layer).groups
    for n in range(limit):
        layer.group_add_sync(f"g{n}", "member")
    with pytest.raises(SegmentFull) as raised:
        layer.group_add_sync("g-last", "member")
    text = str(raised.value)
    assert f"all {limit} group entries are in use" in text
    assert layer.segment_name in text
    layer.group_discard_sync("g0", "member")
    layer.group_add_sync("g-last", "member")


def test_membership_table_full_is_a_clear_error(make_layer):
    layer = make_layer(size=SMALL)
    shape = geometry(layer)
    per_group = shape.members // (shape.groups - 1) + 1
    added = 0
    with pytest.raises(SegmentFull) as raised:
        for g in range(shape.groups):
            for c in range(per_group):
                layer.group_add_sync(f"g{g}", f"c{c}")
                added += 1
    assert added == shape.members
    text = str(raised.value)
    assert f"all {shape.members} membership entries are in use" in text
    assert layer.segment_name in text


# /dev/shm too small: a private tmpfs in a private mount namespace.

SMALL_SHM_SCRIPT = textwrap.dedent("""
    import asyncio, json, os, sys
    sys.path.insert(0, sys.argv[1])
    from dmb import SegmentError, SegmentFull, SharedMemoryChannelLayer
    from hardening_support import message

    report = {}
    try:
        SharedMemoryChannelLayer(prefix="toobig", size=8 << 20)
    except SegmentError as exc:
        report["too_big"] = str(exc)
    report["left_behind"] = sorted(os.listdir("/dev/shm"))
    layer = SharedMemoryChannelLayer(prefix="fits", size=1536 << 10)
    sent = 0
    try:
        for n in range(1000):
            layer.send_sync(f"fill.{n}", message(n, size=100_000))
            sent += 1
    except SegmentFull as exc:
        report["full"] = str(exc)
    report["sent"] = sent
    try:
        SharedMemoryChannelLayer(prefix="second", size=1 << 20)
    except SegmentError as exc:
        report["second"] = str(exc)
    print(json.dumps(report))
    """)


def test_small_dev_shm_is_a_clear_error_not_sigbus():
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a private /dev/shm")
    here = os.path.dirname(os.path.abspath(__file__))
    command = (
        "mount -t tmpfs -o size=2m,mode=1777 tmpfs /dev/shm && "
        f'exec {sys.executable} -c "$0" {here}'
    )
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", command, SMALL_SHM_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0 and "mount" in done.stderr and "ermission" in done.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {done.stderr.strip()}")
    assert done.returncode == 0, f"status {done.returncode}:\n{done.stderr}"
    report = json.loads(done.stdout)
    too_big = report["too_big"]
    assert "cannot reserve 8388608 bytes" in too_big and "/dmb-" in too_big
    assert "CONFIG 'size'" in too_big and "/dev/shm" in too_big
    assert not [n for n in report["left_behind"] if n.startswith("dmb-")]
    # The segment that fitted fills up with a clear error, never a SIGBUS.
    assert report["sent"] >= 5 and "is full" in report["full"]
    assert "cannot reserve" in report["second"]
