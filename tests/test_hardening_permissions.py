"""Permissions: who may attach to a segment and who may wake its processes.

By default the segment and every FIFO are 0600 whatever the umask, so a
process of another user can neither attach, nor write to anyone's FIFO,
nor remove them.  With ``mode=0o660`` the files belong to the creator's
group, and a process of another user in that group attaches and wakes;
one outside it still cannot.

Root ignores file modes, so the other users are real ones made for the
test (``useradd --system``, removed at teardown), and their side runs in a
forked child that drops to them with ``os.setuid``: the interpreter here
lives under /root, which they could not exec from.
"""

import asyncio
import contextlib
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import traceback

import pytest

from dmb import SegmentError, SharedMemoryChannelLayer
from dmb.segment import Segment, segment_name, segment_path, unlink_segment

from conftest import TEST_SIZE

pytestmark = pytest.mark.timeout(60)


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def fifos_of(layer):
    return [
        f"{segment_path(layer.segment_name)}.{layer._token:016x}.wake",
    ]


@contextlib.contextmanager
def umask(value):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_segment_and_fifos_are_0600_by_default(make_layer, mask):
    with umask(mask):
        layer = make_layer()
    assert mode_of(segment_path(layer.segment_name)) == 0o600
    for fifo in fifos_of(layer):
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
        assert mode_of(fifo) == 0o600


def test_mode_0660_is_kept_whatever_the_umask(prefix):
    with umask(0o077):
        layer = SharedMemoryChannelLayer(prefix=prefix, size=TEST_SIZE, mode=0o660)
    try:
        assert mode_of(segment_path(layer.segment_name)) == 0o660
        for fifo in fifos_of(layer):
            assert mode_of(fifo) == 0o660
    finally:
        layer.close_sync()
        unlink_segment(layer.segment_name)


# Other users.


def _need_root_and_useradd():
    if os.geteuid() != 0:
        pytest.skip("needs root to make test users")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("needs useradd and userdel")


@pytest.fixture
def users():
    """Make system users on demand; remove them (and their groups) after."""
    _need_root_and_useradd()
    made = []

    def make():
        name = f"dmbtest-{secrets.token_hex(4)}"
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--user-group", name],
            check=True,
            capture_output=True,
        )
        made.append(name)
        entry = pwd.getpwnam(name)
        return name, entry.pw_uid, entry.pw_gid

    yield make
    for name in made:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)


def as_user(uid, gid, body, groups=()):
    """Run ``body()`` in a forked child as uid/gid; return what it returned
    (JSON-able) or raise with the child's traceback."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            result = {"ok": body()}
        except BaseException:
            result = {"error": traceback.format_exc()}
        try:
            with os.fdopen(write_end, "w") as out:
                json.dump(result, out)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as reply:
        text = reply.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0, f"the child as uid {uid} failed (status {status})"
    result = json.loads(text)
    assert "error" not in result, result["error"]
    return result["ok"]


def attempts_of_an_outsider(name, fifo):
    """What a process of another user tries against someone's segment."""

    def body():
        found = {}
        try:
            Segment(name, TEST_SIZE).close()
            found["attach"] = "attached"
        except SegmentError as exc:
            found["attach"] = str(exc)
        for what, flags in (("wake", os.O_WRONLY), ("read", os.O_RDONLY)):
            try:
                os.close(os.open(fifo, flags | os.O_NONBLOCK))
                found[what] = "opened"
            except OSError as exc:
                found[what] = exc.strerror
        for what, path in (
            ("remove segment", segment_path(name)),
            ("remove fifo", fifo),
        ):
            try:
                os.unlink(path)
                found[what] = "removed"
            except OSError as exc:
                found[what] = exc.strerror
        return found

    return body


def assert_shut_out(found, name):
    assert "cannot open segment" in found["attach"] and name in found["attach"]
    assert "mode" in found["attach"]  # says which option matters
    assert found["wake"] == "Permission denied"
    assert found["read"] == "Permission denied"
    assert found["remove segment"] == "Operation not permitted"
    assert found["remove fifo"] == "Operation not permitted"


def test_another_user_can_neither_attach_nor_wake(make_layer, users):
    layer = make_layer()
    _, uid, gid = users()
    fifo = fifos_of(layer)[0]
    found = as_user(uid, gid, attempts_of_an_outsider(layer.segment_name, fifo))
    assert_shut_out(found, layer.segment_name)

    # Building a layer with the same prefix gives the other user a segment
    # of its own (its uid is in the name): the two never meet.
    def own_layer():
        other = SharedMemoryChannelLayer(prefix=layer.prefix, size=TEST_SIZE)
        try:
            return other.segment_name
        finally:
            other.close_sync()
            unlink_segment(other.segment_name)

    theirs = as_user(uid, gid, own_layer)
    assert theirs == segment_name(layer.prefix, uid=uid) != layer.segment_name
    assert os.path.exists(segment_path(layer.segment_name))


def test_mode_0660_shares_with_the_group_only(users, prefix):
    member, member_uid, group = users()
    _, outsider_uid, outsider_gid = users()
    # The site's first process runs with the shared group, as a deployment
    # would (say www-data); the segment and its FIFO get that group.
    os.setegid(group)
    try:
        site = SharedMemoryChannelLayer(prefix=prefix, size=TEST_SIZE, mode=0o660)
    finally:
        os.setegid(0)
    name = site.segment_name
    try:
        assert name.startswith("/dmb-s-")
        assert os.stat(segment_path(name)).st_gid == group
        assert mode_of(segment_path(name)) == 0o660
        fifo = fifos_of(site)[0]
        assert os.stat(fifo).st_gid == group and mode_of(fifo) == 0o660

        async def receive_woken_by_member():
            waiting = asyncio.ensure_future(site.receive("shared.jobs"))
            await asyncio.sleep(0.05)  # the site's receive waits on its FIFO

            def member_side():
                other = SharedMemoryChannelLayer(
                    prefix=prefix, size=TEST_SIZE, mode=0o660
                )
                try:
                    other.send_sync("shared.jobs", {"type": "from.member"})
                    return other.segment_name
                finally:
                    other.close_sync()

            loop = asyncio.get_running_loop()
            joined = await loop.run_in_executor(
                None, as_user, member_uid, group, member_side
            )
            return joined, await asyncio.wait_for(waiting, 5)

        joined, got = asyncio.run(receive_woken_by_member())
        assert joined == name
        assert got == {"type": "from.member"}
        # A user outside the group is shut out as before.
        found = as_user(outsider_uid, outsider_gid, attempts_of_an_outsider(name, fifo))
        assert_shut_out(found, name)
    finally:
        site.close_sync()
        unlink_segment(name)
