"""The named segment: its name, its permissions, and what it does with an
object of its name that it did not make (or made in another layout)."""

import logging
import mmap
import os
import stat
import struct

import posix_ipc
import pytest
from dmb_tools import stats

from dmb import SegmentError, SharedMemoryChannelLayer
from dmb.errors import ConfigError
from dmb.segment import (
    LAYOUT_VERSION,
    MIN_SIZE,
    NAME_LIMIT,
    segment_name,
    segment_path,
)

pytestmark = pytest.mark.timeout(30)

#: Where the layout version sits in the header (after the 8-byte magic).
VERSION_OFFSET = 8


def file_mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def with_umask(umask, build):
    old = os.umask(umask)
    try:
        return build()
    finally:
        os.umask(old)


# Permissions.


def test_segment_is_created_mode_0600_by_default(make_layer):
    layer = with_umask(0, make_layer)  # a permissive umask must not widen it
    assert file_mode(segment_path(layer.segment_name)) == 0o600


def test_mode_option_is_honoured_despite_a_narrow_umask(make_layer):
    layer = with_umask(0o077, lambda: make_layer(mode=0o660))
    assert file_mode(segment_path(layer.segment_name)) == 0o660


def test_wake_up_fifo_gets_the_segment_mode(make_layer):
    layer = with_umask(0o077, lambda: make_layer(mode=0o660))
    directory = os.path.dirname(segment_path(layer.segment_name))
    base = os.path.basename(segment_path(layer.segment_name))
    fifos = [
        os.path.join(directory, f)
        for f in os.listdir(directory)
        if f.startswith(base + ".") and f.endswith(".wake")
    ]
    assert fifos, "the layer made no wake-up FIFO next to its segment"
    for fifo in fifos:
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
        assert file_mode(fifo) == 0o660


# Names.


def test_segment_name_is_built_from_uid_and_prefix():
    assert segment_name("myproject", uid=1000) == "/dmb-1000-myproject"
    assert segment_name("myproject") == f"/dmb-{os.getuid()}-myproject"


def test_layer_uses_the_segment_name_of_its_prefix(make_layer, prefix):
    layer = make_layer()
    assert layer.segment_name == segment_name(prefix)
    assert os.path.exists(segment_path(segment_name(prefix)))


def test_segment_name_fitting_the_limit_is_kept_whole():
    head = "/dmb-1000-"
    prefix = "p" * (NAME_LIMIT - len(head))
    assert segment_name(prefix, uid=1000) == head + prefix
    assert len(head + prefix) == NAME_LIMIT == 31


def test_long_prefix_is_shortened_to_31_chars_with_a_hash():
    one = "a-very-long-project-prefix-for-dmb-number-one"
    two = "a-very-long-project-prefix-for-dmb-number-two"
    name_one = segment_name(one, uid=1000)
    name_two = segment_name(two, uid=1000)
    for name in (name_one, name_two):
        assert len(name) <= NAME_LIMIT
        assert name.startswith("/dmb-1000-a-very")
    assert name_one != name_two, "prefixes differing only at the end collide"
    assert segment_name(one, uid=1000) == name_one, "the name is not stable"
    assert name_one.rsplit("~", 1)[1].isalnum()
    assert segment_name(one, uid=1001) != name_one


def test_no_short_prefix_names_a_long_prefixs_segment():
    long_prefix = "atk" + "x" * 300
    shortened = segment_name(long_prefix, uid=1000)
    # The one short prefix that would give the same name is the shortened
    # tail itself, and a prefix cannot hold its "~".
    tail = shortened[len("/dmb-1000-"):]
    assert "~" in tail
    with pytest.raises(ConfigError, match="'prefix'"):
        SharedMemoryChannelLayer(prefix=tail)


@pytest.mark.parametrize("prefix", ["site\n", "site\r\n", "\nsite", "si te"])
def test_a_prefix_with_a_line_break_or_space_is_refused(prefix):
    with pytest.raises(ConfigError, match="'prefix'"):
        SharedMemoryChannelLayer(prefix=prefix)


def test_long_prefix_layer_gets_a_working_segment(make_layer, prefix):
    long_prefix = prefix + "-" + "x" * 40
    layer = make_layer(prefix=long_prefix)
    assert len(layer.segment_name) <= NAME_LIMIT
    assert layer.segment_name == segment_name(long_prefix)
    layer.send_sync("long.prefix", {"type": "ok"})
    assert stats(layer.segment_name)["queued"] == 1


def test_two_prefixes_get_two_separate_segments(make_layer, prefix):
    first = make_layer(prefix=prefix + "a")
    second = make_layer(prefix=prefix + "b")
    assert first.segment_name != second.segment_name
    first.send_sync("shared.name", {"type": "first"})
    assert stats(first.segment_name)["queued"] == 1
    assert stats(second.segment_name)["queued"] == 0


# Objects of the segment's name that dmb did not make.


def make_object(name, size, content=b""):
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    try:
        if content:
            with mmap.mmap(shm.fd, size) as view:
                view[: len(content)] = content
    finally:
        shm.close_fd()


def test_zero_filled_object_of_the_name_is_formatted(make_layer, prefix, caplog):
    name = segment_name(prefix)
    make_object(name, MIN_SIZE * 2)
    with caplog.at_level(logging.WARNING, logger="dmb.segment"):
        layer = make_layer()
    assert any("never initialised" in r.getMessage() for r in caplog.records)
    counts = stats(name)
    assert counts["version"] == LAYOUT_VERSION
    layer.send_sync("after.format", {"type": "ok"})
    assert stats(name)["queued"] == 1


def test_empty_object_of_the_name_is_formatted(make_layer, prefix):
    name = segment_name(prefix)
    make_object(name, 0)
    layer = make_layer()
    assert os.stat(segment_path(name)).st_size == layer.size
    assert stats(name)["version"] == LAYOUT_VERSION


def test_non_dmb_object_is_a_clear_error_naming_it_and_its_removal(make_layer, prefix):
    name = segment_name(prefix)
    content = b"this object belongs to some other program" * 4
    make_object(name, MIN_SIZE, content)
    with pytest.raises(SegmentError) as caught:
        make_layer()
    text = str(caught.value)
    assert repr(name) in text
    assert "not a dmb segment" in text
    assert "dmb.inspect --unlink" in text
    assert segment_path(name) in text
    with open(segment_path(name), "rb") as f:
        assert f.read(len(content)) == content, "dmb wrote over a foreign object"


def test_version_mismatch_is_a_clear_error(make_layer, prefix):
    first = make_layer()
    first.close_sync()
    path = segment_path(first.segment_name)
    with open(path, "r+b") as f:
        f.seek(VERSION_OFFSET)
        (version,) = struct.unpack("=I", f.read(4))
        assert version == LAYOUT_VERSION
        f.seek(VERSION_OFFSET)
        f.write(struct.pack("=I", LAYOUT_VERSION + 1))
    with pytest.raises(SegmentError) as caught:
        make_layer()
    text = str(caught.value)
    assert repr(first.segment_name) in text
    assert f"layout version {LAYOUT_VERSION + 1}" in text
    assert f"uses {LAYOUT_VERSION}" in text
    assert "--unlink" in text


@pytest.mark.parametrize("kind", ["directory", "FIFO"])
def test_a_name_taken_by_a_directory_or_fifo_is_a_clear_error(prefix, kind):
    path = segment_path(segment_name(prefix))
    os.mkdir(path) if kind == "directory" else os.mkfifo(path)
    try:
        with pytest.raises(SegmentError) as caught:
            SharedMemoryChannelLayer(prefix=prefix, size=1 << 20)
        message = str(caught.value)
        assert f"{path} is a {kind}, not a shared-memory segment" in message
        assert "CONFIG 'prefix'" in message
    finally:
        os.rmdir(path) if kind == "directory" else os.unlink(path)
