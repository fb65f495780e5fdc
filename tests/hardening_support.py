"""Shared pieces of the hardening tests (tests/test_hardening_*.py).

They read the segment through the C core's own read-out functions, so what
they assert is the state every process shares, not one layer's view of it.
Messages they send describe themselves (a sequence number, a blob and its
CRC), so a torn or mixed-up message is caught wherever it arrives.
"""

import os
import signal
import zlib

from dmb._ring_cffi import ffi, lib

# The tests take these from here with the rest.
from dmb_tools import OUTCOMES, USAGE, identity_holds  # noqa: F401
from dmb_tools import stats_of as stats


def handle_of(layer):
    """The C handle of a layer's mapping (attaching it if need be)."""
    if layer._slot is None:
        layer._attach()
    return layer._h


def format_counters(numbers):
    keys = ("sent",) + OUTCOMES + ("queued",)
    line = " ".join(f"{key}={numbers[key]}" for key in keys)
    extra = " ".join(
        f"{key}={numbers[key]}"
        for key in ("group_sends", "refused_full", "refused_nospace", "repairs")
    )
    return f"{line} | {extra}"


def repair_changes_nothing(handle):
    """Run dmb_repair; return the usage before and after (they must match)."""
    before = stats(handle)
    assert lib.dmb_repair(handle) == 0
    after = stats(handle)
    return {k: before[k] for k in USAGE}, {k: after[k] for k in USAGE}


def channels(handle):
    """{name: struct dmb_channel_info} of every channel entry in use."""
    out = ffi.new("struct dmb_stats *")
    lib.dmb_stats(handle, out)
    found = {}
    for index in range(out.geometry.channels):
        info = ffi.new("struct dmb_channel_info *")
        if lib.dmb_channel_at(handle, index, info) == 1:
            found[ffi.string(info.name).decode()] = info
    return found


def group_members(handle, group):
    """The channel names of a group's memberships."""
    name = group.encode()
    out = ffi.new("struct dmb_member_info[]", 256)
    count = lib.dmb_group_members(handle, name, len(name), 0, out, 256)
    assert count >= 0, count
    return {ffi.string(out[i].channel).decode() for i in range(count)}


def slots(handle):
    """{slot index: (pid, start_time, client)} of every slot in use."""
    info = ffi.new("struct dmb_slot_info *")
    found = {}
    for index in range(lib.DMB_MAX_SLOTS):
        lib.dmb_slot_info(handle, index, info)
        if info.in_use:
            found[index] = (info.pid, info.start_time, ffi.string(info.client))
    return found


def slot_of_pid(handle, pid):
    return [index for index, (p, _, _) in slots(handle).items() if p == pid]


def message(seq, size=600, kind="hard.msg"):
    """A message that carries the means to check it arrived whole."""
    blob = bytes((seq * 31 + i * 7) & 0xFF for i in range(size))
    return {"type": kind, "seq": seq, "blob": blob, "crc": zlib.crc32(blob)}


def is_whole(received):
    """Did this message arrive exactly as message() made it?"""
    try:
        blob = received["blob"]
        seq = received["seq"]
    except (KeyError, TypeError):
        return False
    expected = bytes((seq * 31 + i * 7) & 0xFF for i in range(len(blob)))
    return zlib.crc32(blob) == received["crc"] and blob == expected


def kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
