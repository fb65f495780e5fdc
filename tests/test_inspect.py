"""python -m dmb.inspect: its views, its JSON schema, its exit codes.

Every test makes its own segment (the ``prefix`` fixture) and removes it.
The tool runs either in this process (``run_main``, fast, for exact
assertions) or as a real ``python -m dmb.inspect`` process (``run_cli``),
and for the live view inside a real pseudo-terminal.
"""

import asyncio
import base64
import contextlib
import errno
import fcntl
import io
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time

import msgpack
import pytest
from conftest import TEST_SIZE
from dmb._ring_cffi import ffi, lib

from dmb import inspect as dmb_inspect
from dmb.segment import Segment, segment_name, segment_path

pytestmark = pytest.mark.timeout(60)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ESC = "\x1b"


def run_main(*args, channel_layers=None):
    """Run the tool in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = dmb_inspect.main(
        list(args), channel_layers=channel_layers, stdout=out, stderr=err
    )
    return code, out.getvalue(), err.getvalue()


def run_json(*args):
    code, out, err = run_main(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def run_cli(*args, timeout=30, **kwargs):
    """Run ``python -m dmb.inspect`` as a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "dmb.inspect", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=kwargs.pop("cwd", REPO),
        **kwargs,
        check=False,
    )


def segment_stats(name):
    segment = Segment(name, create=False)
    try:
        stats = ffi.new("struct dmb_stats *")
        assert lib.dmb_stats(segment.handle, stats) == 0
        return stats
    finally:
        segment.close()


def packed(message):
    return len(msgpack.packb(message, use_bin_type=True))


# The list view.


def test_list_shows_each_segment_once_with_its_processes(make_layer):
    layer = make_layer()
    make_layer()
    result = run_cli()
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if layer.segment_name in line]
    assert len(rows) == 1  # the wake-up FIFOs beside it are not segments
    cells = rows[0].split()
    assert cells[0] == layer.segment_name
    assert cells[-4:] == ["0", "2", "0", "ok"]  # queued, live, dead, status


def test_list_json_describes_each_segment(make_layer):
    layer = make_layer()
    layer.send_sync("inspect.list", {"text": "x"})
    document = run_json()
    assert document["schema"] == "dmb.inspect/1"
    assert document["view"] == "list"
    assert set(document) == {"schema", "view", "generated_at", "segments", "unreadable"}
    (entry,) = [e for e in document["segments"] if e["name"] == layer.segment_name]
    assert entry == {
        "name": layer.segment_name,
        "path": segment_path(layer.segment_name),
        "uid": os.getuid(),
        "mode": "0600",
        "status": "ok",
        "error": None,
        "layout_version": 1,
        "size": TEST_SIZE,
        "used_bytes": lib.DMB_BLOCK_SIZE,
        "capacity_bytes": entry["capacity_bytes"],
        "queued_messages": 1,
        "processes": {"live": 1, "dead": 0},
    }
    assert 0 < entry["capacity_bytes"] < TEST_SIZE


# One segment: the JSON schema against a known state.


async def test_json_matches_the_queued_state_field_by_field(make_layer):
    sender, owner = make_layer(), make_layer()
    work = [{"type": "job", "n": n, "data": b"\x00" * n} for n in range(3)]
    for message in work:
        await sender.send("inspect.work", message)
    private = await owner.new_channel()
    await sender.group_add("room", "inspect.work")
    await owner.group_add("room", private)
    news = {"type": "news"}
    await sender.group_send("room", news)
    waiting = asyncio.ensure_future(owner.receive("inspect.idle"))
    await asyncio.sleep(0.05)  # the receive marks itself waiting
    try:
        code, out, err = await asyncio.to_thread(
            run_main, "--prefix", sender.prefix, "--members", "room", "--json"
        )
    finally:
        waiting.cancel()
    assert code == 0, err
    document = json.loads(out)
    now = time.time()

    assert set(document) == {
        "schema",
        "view",
        "generated_at",
        "segment",
        "processes",
        "channels",
        "groups",
        "members",
        "counters",
        "rates",
        "celery",
    }
    assert document["celery"] == []  # no Celery queue in this segment
    assert document["schema"] == "dmb.inspect/1"
    assert document["view"] == "segment"
    assert abs(document["generated_at"] - now) < 5
    assert document["rates"] is None

    header = document["segment"]
    assert set(header) == {
        "name",
        "path",
        "uid",
        "mode",
        "layout_version",
        "size",
        "block_size",
        "created_at",
        "store",
        "tables",
    }
    assert header["name"] == segment_name(sender.prefix)
    assert header["path"] == segment_path(header["name"])
    assert header["uid"] == os.getuid()
    assert header["mode"] == "0600"
    assert header["layout_version"] == 1
    assert header["size"] == TEST_SIZE
    assert header["block_size"] == lib.DMB_BLOCK_SIZE
    assert now - 60 < header["created_at"] <= now
    # Each message fits one block; the group message is stored once.
    assert header["store"] == {
        "capacity_bytes": header["store"]["capacity_bytes"],
        "used_bytes": 4 * lib.DMB_BLOCK_SIZE,
        "high_water_bytes": 4 * lib.DMB_BLOCK_SIZE,
        "queued_messages": 5,
    }
    tables = header["tables"]
    assert set(tables) == {
        "slots",
        "channels",
        "groups",
        "memberships",
        "queue_entries",
        "blocks",
    }
    assert tables["slots"] == {"used": 2, "total": lib.DMB_MAX_SLOTS}
    assert tables["channels"]["used"] == 3  # work, private, idle (waited on)
    assert tables["groups"]["used"] == 1
    assert tables["memberships"]["used"] == 2
    assert tables["queue_entries"]["used"] == 5
    assert tables["blocks"]["used"] == 4

    processes = {p["slot"]: p for p in document["processes"]}
    assert set(processes) == {sender._slot, owner._slot}
    for layer, owned in ((sender, 0), (owner, 1)):
        process = processes[layer._slot]
        assert set(process) == {
            "slot",
            "pid",
            "alive",
            "client",
            "channels_owned",
            "attached_seconds",
            "idle_seconds",
        }
        assert process["pid"] == os.getpid()
        assert process["alive"] is True
        assert process["client"] == layer._client
        assert process["channels_owned"] == owned
        assert 0 <= process["idle_seconds"] <= process["attached_seconds"] < 60

    channels = document["channels"]
    assert [c["name"] for c in channels] == ["inspect.work", private, "inspect.idle"]
    work_channel, private_channel, idle_channel = channels
    assert set(work_channel) == {
        "name",
        "specific",
        "owner_slot",
        "depth",
        "capacity",
        "bytes",
        "oldest_age_seconds",
        "waiting",
        "waiting_slots",
        "memberships",
    }
    assert work_channel["specific"] is False
    assert work_channel["owner_slot"] is None
    assert work_channel["depth"] == 4
    assert work_channel["capacity"] == 100
    assert work_channel["bytes"] == sum(map(packed, work)) + packed(news)
    assert 0 <= work_channel["oldest_age_seconds"] < 60
    assert work_channel["waiting"] == 0
    assert work_channel["waiting_slots"] == []
    assert work_channel["memberships"] == 1
    assert private_channel["specific"] is True
    assert private_channel["owner_slot"] == owner._slot
    assert private_channel["depth"] == 1
    assert private_channel["bytes"] == packed(news)
    assert private_channel["memberships"] == 1
    assert idle_channel["depth"] == 0
    assert idle_channel["oldest_age_seconds"] is None
    assert idle_channel["waiting"] == 1
    assert idle_channel["waiting_slots"] == [owner._slot]

    assert document["groups"] == [{"name": "room", "members": 2}]
    members = document["members"]
    assert members["group"] == "room"
    assert [m["channel"] for m in members["members"]] == sorted(
        ["inspect.work", private]
    )
    for member in members["members"]:
        assert set(member) == {"channel", "age_seconds"}
        assert 0 <= member["age_seconds"] < 60

    assert document["counters"] == {
        "sent": 5,
        "received": 0,
        "expired": 0,
        "dropped_full": 0,
        "dropped_dead": 0,
        "flushed": 0,
        "group_sends": 1,
        "bytes_sent": sum(map(packed, work)) + 2 * packed(news),
        "bytes_received": 0,
        "refused_full": 0,
        "refused_nospace": 0,
        "repairs": 0,
    }


async def test_json_follows_a_receive_and_members_default_to_null(make_layer):
    layer = make_layer()
    await layer.send("inspect.one", {"n": 1})
    await layer.send("inspect.one", {"n": 2})
    assert await layer.receive("inspect.one") == {"n": 1}
    document = run_json("--prefix", layer.prefix)
    assert document["members"] is None
    (channel,) = document["channels"]
    assert (channel["name"], channel["depth"]) == ("inspect.one", 1)
    assert document["counters"]["received"] == 1
    assert document["counters"]["bytes_received"] == packed({"n": 1})
    assert document["segment"]["store"]["high_water_bytes"] == 2 * lib.DMB_BLOCK_SIZE
    assert document["segment"]["store"]["used_bytes"] == lib.DMB_BLOCK_SIZE


def test_text_view_shows_every_section(make_layer):
    layer = make_layer()
    layer.send_sync("inspect.text", {"n": 1})
    layer.group_add_sync("lobby", "inspect.text")
    code, out, err = run_main("--prefix", layer.prefix, "--members", "lobby")
    assert code == 0, err
    assert out.startswith(f"segment {layer.segment_name}  ")
    for title in ("PROCESSES  1 live, 0 dead", "CHANNELS  1", "GROUPS  1"):
        assert title in out
    assert "MEMBERS OF lobby  1" in out
    assert re.search(
        r"^  inspect\.text\s+1\s+100\s+\d+ B\s+[\d.]+s\s+0\s+-$", out, re.MULTILINE
    )
    assert re.search(r"^  sent\s+1$", out, re.MULTILINE)
    assert "layout version 1, 4.0 MiB" in out


def test_settings_module_names_the_segment(make_layer, tmp_path):
    layer = make_layer()
    (tmp_path / "inspect_site.py").write_text(textwrap.dedent(f"""
            CHANNEL_LAYERS = {{
                "default": {{"BACKEND": "channels.layers.InMemoryChannelLayer"}},
                "dmb": {{
                    "BACKEND": "dmb.SharedMemoryChannelLayer",
                    "CONFIG": {{"prefix": {layer.prefix!r}}},
                }},
            }}
            """))
    result = run_cli("--settings", "inspect_site", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["segment"]["name"] == layer.segment_name


def test_management_command_inspects_the_project_segment(make_layer, tmp_path):
    layer = make_layer()
    (tmp_path / "inspect_project.py").write_text(textwrap.dedent(f"""
            SECRET_KEY = "test"
            INSTALLED_APPS = ["dmb"]
            CHANNEL_LAYERS = {{
                "default": {{
                    "BACKEND": "dmb.SharedMemoryChannelLayer",
                    "CONFIG": {{"prefix": {layer.prefix!r}}},
                }}
            }}
            """))
    env = dict(
        os.environ, DJANGO_SETTINGS_MODULE="inspect_project", PYTHONPATH=str(tmp_path)
    )
    command = [sys.executable, "-m", "django", "dmb", "inspect"]
    result = subprocess.run(
        command + ["--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["segment"]["name"] == layer.segment_name
    result = subprocess.run(
        command + ["--prefix", layer.prefix + "x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 3
    assert "no such segment" in result.stderr


# Peek, purge and unlink.


def test_peek_decodes_messages_without_taking_them(make_layer):
    layer = make_layer()
    messages = [{"type": "a", "blob": b"\x00\xff", "n": [1, 2.5, None]}, {"x": "y"}]
    for message in messages:
        layer.send_sync("inspect.peek", message)
    document = run_json("--prefix", layer.prefix, "--peek", "inspect.peek")
    assert document["view"] == "peek"
    assert document["channel"] == "inspect.peek"
    first, second = document["messages"]
    assert first["message"] == {
        "type": "a",
        "blob": {"$base64": base64.b64encode(b"\x00\xff").decode()},
        "n": [1, 2.5, None],
    }
    assert (first["position"], first["size"], first["error"]) == (
        0,
        packed(messages[0]),
        None,
    )
    assert second["message"] == {"x": "y"}
    one = run_json("--prefix", layer.prefix, "--peek", "inspect.peek", "-n", "1")
    assert len(one["messages"]) == 1
    shown = run_json(
        "--prefix", layer.prefix, "--peek", "inspect.peek", "--bytes", "repr"
    )
    assert shown["messages"][0]["message"]["blob"] == repr(b"\x00\xff")
    code, out, _ = run_main("--prefix", layer.prefix, "--peek", "inspect.peek")
    assert code == 0 and '"type": "a"' in out
    # Nothing was taken.
    assert segment_stats(layer.segment_name).queued == 2


def test_peek_shows_a_payload_that_is_not_msgpack(make_layer):
    layer = make_layer()
    wake = ffi.new("struct dmb_wake *")
    name = b"inspect.raw"
    now = time.monotonic_ns()
    rc = lib.dmb_send(
        layer._h,
        layer._slot,
        name,
        len(name),
        10,
        b"\xc1\xc1",
        2,
        now,
        now + 10**10,
        wake,
    )
    assert rc == 0
    document = run_json("--prefix", layer.prefix, "--peek", "inspect.raw")
    (message,) = document["messages"]
    assert message["message"] is None
    assert message["error"].startswith("not a msgpack message")
    assert message["raw"] == base64.b64encode(b"\xc1\xc1").decode()


def test_purge_drops_one_channel_and_counts_it_flushed(make_layer):
    layer = make_layer()
    for n in range(3):
        layer.send_sync("inspect.purge", {"n": n})
    layer.send_sync("inspect.keep", {"n": 0})
    document = run_json("--prefix", layer.prefix, "--purge", "inspect.purge")
    assert document == {
        "schema": "dmb.inspect/1",
        "view": "purge",
        "segment": layer.segment_name,
        "channel": "inspect.purge",
        "purged": 3,
    }
    stats = segment_stats(layer.segment_name)
    assert (stats.queued, stats.counters.flushed) == (1, 3)


def test_unlink_is_refused_while_live_processes_are_attached(make_layer):
    layer = make_layer()
    result = run_cli("--prefix", layer.prefix, "--unlink")
    assert result.returncode == 6
    refusal = f"1 live process is attached to {layer.segment_name} (pid {os.getpid()})"
    assert refusal in result.stderr
    assert os.path.exists(segment_path(layer.segment_name))
    result = run_cli("--prefix", layer.prefix, "--unlink", "--force", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["live_processes"] == [os.getpid()]
    assert not os.path.exists(segment_path(layer.segment_name))
    leftovers = [
        f for f in os.listdir("/dev/shm") if f.startswith(layer.segment_name[1:])
    ]
    assert leftovers == []  # the wake-up FIFOs went too


def test_unlink_needs_no_force_once_every_process_is_dead(prefix):
    code = "from dmb import SharedMemoryChannelLayer as L; import os, signal\n"
    code += (
        f"L(prefix={prefix!r}, size={TEST_SIZE}); os.kill(os.getpid(), signal.SIGKILL)"
    )
    subprocess.run([sys.executable, "-c", code], timeout=30, check=False)
    document = run_json("--prefix", prefix)
    assert [p["alive"] for p in document["processes"]] == [False]
    assert run_main("--prefix", prefix, "--unlink")[0] == 0
    assert not os.path.exists(segment_path(segment_name(prefix)))


# Prometheus.


def test_prometheus_exposition(make_layer):
    layer = make_layer()
    layer.send_sync("inspect.prom", {"n": 1})
    code, out, err = run_main("--prefix", layer.prefix, "--prometheus")
    assert code == 0, err
    label = f'segment="{layer.segment_name}"'
    samples = {}
    declared = []
    for line in out.splitlines():
        if line.startswith("# TYPE "):
            declared.append(line.split()[2])
            continue
        if line.startswith("#"):
            continue
        metric, value = line.rsplit(" ", 1)
        name = metric.split("{", 1)[0]
        assert name == declared[-1]  # every sample follows its family's TYPE
        samples[metric] = float(value)
    assert len(declared) == len(set(declared))
    assert samples[f"dmb_segment_up{{{label}}}"] == 1
    assert samples[f"dmb_segment_size_bytes{{{label}}}"] == TEST_SIZE
    assert samples[f"dmb_queued_messages{{{label}}}"] == 1
    assert samples[f'dmb_processes{{{label},state="live"}}'] == 1
    assert samples[f"dmb_messages_sent_total{{{label}}}"] == 1
    assert samples[f'dmb_messages_dropped_total{{{label},reason="dead"}}'] == 0
    assert samples[f'dmb_channel_depth{{{label},channel="inspect.prom"}}'] == 1
    code, out, err = run_main("--prometheus")
    assert code == 0 and f"dmb_segment_up{{{label}}} 1" in out


# Under live traffic from other processes.

WORKER = """
import asyncio, os, sys, time
from channels.exceptions import ChannelFull
from dmb import SharedMemoryChannelLayer

prefix, role, progress = sys.argv[1:4]


def report(count):
    with open(progress + ".tmp", "w") as f:
        f.write(str(count))
    os.replace(progress + ".tmp", progress)


async def produce(layer):
    count = 0
    while True:
        try:
            await layer.send("load.q", {"n": count, "pad": "x" * (count % 300)})
            count += 1
        except ChannelFull:
            await asyncio.sleep(0.001)
        if count % 20 == 0:
            await layer.group_send("load.g", {"n": count})
            report(count)
            await asyncio.sleep(0)


async def consume(layer):
    own = await layer.new_channel()
    await layer.group_add("load.g", own)

    async def drain_group():
        while True:
            await layer.receive(own)

    asyncio.ensure_future(drain_group())
    count = 0
    while True:
        await layer.receive("load.q")
        count += 1
        if count % 20 == 0:
            report(count)


async def main():
    layer = SharedMemoryChannelLayer(prefix=prefix, size=4194304, capacity=50)
    await (produce if role == "producer" else consume)(layer)


asyncio.run(main())
"""


def progress_of(path):
    try:
        with open(path) as f:
            return int(f.read() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def wait_for(predicate, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def drawn(lines):
    """How many frames a live view (not on a terminal) has written."""
    return sum(line.startswith("COUNTERS") for line in lines)


@pytest.fixture
def traffic(prefix, tmp_path):
    """A producer and two consumers in processes of their own."""
    workers = []
    for index, role in enumerate(("producer", "consumer", "consumer")):
        progress = str(tmp_path / f"{role}{index}")
        process = subprocess.Popen(
            [sys.executable, "-c", WORKER, prefix, role, progress]
        )
        workers.append((process, progress))
    try:
        assert wait_for(lambda: all(progress_of(p) > 0 for _, p in workers))
        yield workers
    finally:
        for process, _ in workers:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.timeout(90)
def test_inspect_under_live_traffic_never_stalls_the_workers(prefix, traffic):
    pids = sorted(process.pid for process, _ in traffic)
    snapshots = []
    for _ in range(5):
        result = run_cli("--prefix", prefix, "--json", "--members", "load.g")
        assert result.returncode == 0, result.stderr
        snapshots.append(json.loads(result.stdout))
    watch = subprocess.Popen(
        [sys.executable, "-m", "dmb.inspect", "--prefix", prefix, "--watch", "0.05"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    frames = []
    reader = threading.Thread(target=lambda: frames.extend(watch.stdout), daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: drawn(frames) >= 1)
        before = [progress_of(p) for _, p in traffic]
        # While the live view redraws as fast as it can, every worker goes on.
        assert wait_for(lambda: drawn(frames) >= 5)
        assert wait_for(
            lambda: all(progress_of(p) > b + 40 for (_, p), b in zip(traffic, before))
        )
    finally:
        watch.send_signal(signal.SIGINT)
        watch.wait(timeout=10)
        reader.join(timeout=10)
    assert watch.returncode == 0

    for document in snapshots:
        processes = document["processes"]
        # Only the three workers hold slots: inspecting took none.
        assert sorted(p["pid"] for p in processes) == pids
        assert all(p["alive"] for p in processes)
        assert document["segment"]["tables"]["slots"]["used"] == 3
        assert len(document["members"]["members"]) == 2
    sent = [d["counters"]["sent"] for d in snapshots]
    received = [d["counters"]["received"] for d in snapshots]
    assert sent == sorted(sent) and sent[-1] > sent[0]
    assert received == sorted(received) and received[-1] > received[0]
    for document in snapshots:
        for channel in document["channels"]:
            assert 0 <= channel["depth"] <= channel["capacity"] == 50


# The live view, in a real terminal.


class Screen:
    """Enough of a terminal to replay what the live view writes."""

    def __init__(self, rows, columns):
        self.rows, self.columns = rows, columns
        self.main = self._blank()
        self.alternate = self._blank()
        self.lines = self.main
        self.row = self.column = 0
        self.alternate_used = False

    def _blank(self):
        return [[" "] * self.columns for _ in range(self.rows)]

    def feed(self, text):
        for match in re.finditer(
            r"\x1b\[(\??)([\d;]*)([A-Za-z])|\r|\n|[^\x1b\r\n]", text
        ):
            self._apply(match)

    def _apply(self, match):
        token = match.group(0)
        if token == "\r":
            self.column = 0
        elif token == "\n":
            self._newline()
        elif token.startswith(ESC):
            self._control(match.group(1), match.group(2), match.group(3))
        elif self.column < self.columns:
            self.lines[self.row][self.column] = token
            self.column += 1

    def _newline(self):
        if self.row == self.rows - 1:
            self.lines.pop(0)
            self.lines.append([" "] * self.columns)
        else:
            self.row += 1

    def _control(self, private, params, final):
        if private and params == "1049":
            self.alternate_used |= final == "h"
            self.lines = self.alternate if final == "h" else self.main
            if final == "h":
                self.alternate[:] = self._blank()
        elif final == "H":
            parts = [int(p) for p in params.split(";") if p] or [1, 1]
            self.row, self.column = parts[0] - 1, (
                parts[1] - 1 if len(parts) > 1 else 0
            )
        elif final == "J":
            start = self.row + 1 if params != "2" else 0
            self.lines[self.row][self.column :] = [" "] * (self.columns - self.column)
            for row in range(start, self.rows):
                self.lines[row] = [" "] * self.columns
        elif final == "K":
            self.lines[self.row][self.column :] = [" "] * (self.columns - self.column)

    def text(self):
        return "\n".join("".join(line).rstrip() for line in self.lines)


def spawn_in_pty(argv, rows, columns):
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.chdir(REPO)
            os.execv(sys.executable, [sys.executable, *argv])
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    return pid, fd


def read_pty(fd, seconds):
    chunks = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError as exc:
            if exc.errno == errno.EIO:  # the child has gone
                break
            raise
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def wait_exit(pid, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the live view did not exit")


def test_live_view_redraws_in_place_and_ctrl_c_exits_0(make_layer):
    layer = make_layer()
    layer.send_sync("inspect.live", {"n": 0})
    rows, columns = 40, 120
    argv = ["-m", "dmb.inspect", "--prefix", layer.prefix, "--watch", "0.2"]
    pid, fd = spawn_in_pty(argv, rows, columns)
    try:
        screen = Screen(rows, columns)
        output = read_pty(fd, 1.5)
        for n in range(1, 31):
            layer.send_sync("inspect.live", {"n": n})
        output += read_pty(fd, 1.5)
        screen.feed(output)
        shown = screen.text()
        os.write(fd, b"\x03")  # Ctrl-C, through the terminal's line discipline
        output += read_pty(fd, 3)
        code = wait_exit(pid)
    finally:
        os.close(fd)
    assert code == 0
    assert output.count("\x1b[H") >= 4  # one home per frame: redrawn in place
    assert screen.alternate_used
    # The screen holds one frame: one title, the newest depth, live rates.
    assert shown.count("dmb.inspect  every 0.2s") == 1
    assert shown.splitlines()[0].startswith("dmb.inspect  every 0.2s")
    assert f"segment {layer.segment_name}" in shown
    assert re.search(r"^  inspect\.live\s+31\s+100\b", shown, re.MULTILINE), shown
    assert re.search(r"sent\s+31\s+[\d.]+/s", shown), shown
    assert "PROCESSES  1 live, 0 dead" in shown
    assert all(len(line) <= columns for line in shown.splitlines())
    # On exit the terminal gets its own screen back.
    assert output.rstrip().endswith("\x1b[?1049l")


def test_live_view_fits_a_small_terminal(make_layer):
    layer = make_layer()
    for n in range(40):
        layer.send_sync(f"inspect.small{n:02d}", {"n": n})
    rows, columns = 24, 80
    pid, fd = spawn_in_pty(
        ["-m", "dmb.inspect", "--prefix", layer.prefix, "--watch", "0.2"], rows, columns
    )
    try:
        output = read_pty(fd, 2)
        os.write(fd, b"\x03")
        output += read_pty(fd, 3)
        code = wait_exit(pid)
    finally:
        os.close(fd)
    assert code == 0
    screen = Screen(rows, columns)
    frame = output[: output.rindex("\x1b[?25h")]  # the last frame, before exit
    screen.feed(frame)
    shown = screen.text()
    assert shown.splitlines()[0].startswith("dmb.inspect")
    assert "COUNTERS" in shown
    assert "more (--limit, --json)" in shown
    assert len(shown.splitlines()) == rows


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_live_view_in_tmux(make_layer, tmp_path):
    layer = make_layer()
    layer.send_sync("inspect.tmux", {"n": 1})
    session = f"dmbinspect{os.getpid()}"
    marker = tmp_path / "exit"
    command = (
        f"cd {REPO} && {sys.executable} -m dmb.inspect --prefix {layer.prefix} "
        f"--watch 0.2; echo $? > {marker}"
    )
    tmux = ["tmux", "-L", session]
    subprocess.run(
        tmux + ["new-session", "-d", "-s", session, "-x", "120", "-y", "40", command],
        check=True,
        timeout=10,
    )
    try:
        assert wait_for(
            lambda: "COUNTERS" in capture(tmux, session)
            and "/s" in capture(tmux, session)
        )
        shown = capture(tmux, session)
        assert shown.splitlines()[0].startswith("dmb.inspect  every 0.2s")
        assert re.search(r"^  inspect\.tmux\s+1\s+100\b", shown, re.MULTILINE), shown
        subprocess.run(tmux + ["send-keys", "-t", session, "C-c"], check=True)
        assert wait_for(lambda: marker.exists() and marker.read_text().strip())
        assert marker.read_text().strip() == "0"
    finally:
        subprocess.run(tmux + ["kill-server"], timeout=10, check=False)


def capture(tmux, session):
    result = subprocess.run(
        tmux + ["capture-pane", "-p", "-t", session],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return result.stdout


def test_watch_json_is_one_document_per_line_with_rates(make_layer):
    layer = make_layer()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dmb.inspect",
            "--prefix",
            layer.prefix,
            "--watch",
            "0.1",
            "--json",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        first = json.loads(process.stdout.readline())
        layer.send_sync("inspect.rate", {"n": 1})
        second = json.loads(process.stdout.readline())
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=10)
    assert process.returncode == 0
    assert first["rates"] is None
    assert set(second["rates"]) == set(second["counters"])
    assert second["rates"]["sent"] >= 0


# Damaged, foreign and missing segments.


def test_no_such_segment_is_exit_3_and_nothing_is_created(prefix):
    result = run_cli("--prefix", prefix)
    assert result.returncode == 3
    assert "no such segment" in result.stderr
    assert not os.path.exists(segment_path(segment_name(prefix)))
    result = run_cli("--prefix", prefix, "--json")
    assert json.loads(result.stdout) == {
        "schema": "dmb.inspect/1",
        "view": "error",
        "exit_code": 3,
        "error": result.stderr.split(": ", 1)[1].strip(),
    }
    for action in (["--peek", "x.y"], ["--purge", "x.y"], ["--unlink"]):
        assert run_main("--prefix", prefix, *action)[0] == 3


def write_object(name, data):
    with open(segment_path(name), "wb") as f:
        f.write(data)


def made_segment(prefix, size=TEST_SIZE):
    """A formatted segment with nobody attached."""
    segment = Segment(segment_name(prefix), size)
    segment.close()
    return segment_name(prefix)


def patch(name, offset, data):
    fd = os.open(segment_path(name), os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "damage, code, status, words",
    [
        ("garbage", 5, "not_dmb", "is not a dmb segment"),
        ("zeros", 5, "uninitialised", "never initialised"),
        ("version", 5, "other_version", "layout version 99"),
        ("truncated", 7, "damaged", "is truncated"),
    ],
)
def test_a_bad_segment_is_refused_with_its_exit_code(
    prefix, damage, code, status, words
):
    name = segment_name(prefix)
    if damage == "garbage":
        write_object(name, os.urandom(1 << 20))
    elif damage == "zeros":
        write_object(name, bytes(1 << 20))
    else:
        made_segment(prefix)
        if damage == "version":
            patch(name, 8, (99).to_bytes(4, "little"))
        else:
            os.truncate(segment_path(name), 1 << 20)
    with open(segment_path(name), "rb") as f:
        before = f.read()
    result = run_cli("--name", name)
    assert result.returncode == code
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    (entry,) = [e for e in run_json()["segments"] if e["name"] == name]
    assert entry["status"] == status and words in entry["error"]
    with open(segment_path(name), "rb") as f:
        assert f.read() == before  # looked at, never formatted or changed
    assert run_main("--name", name, "--unlink")[0] == 6  # cannot tell who uses it
    assert run_main("--name", name, "--unlink", "--force")[0] == 0


def test_a_fifo_named_like_a_segment_is_not_one(prefix):
    name = segment_name(prefix)
    os.mkfifo(segment_path(name))
    try:
        code, _, err = run_main("--name", name)
        assert code == 5 and "not a shared-memory segment" in err
        assert all(e["name"] != name for e in run_json()["segments"])
    finally:
        os.unlink(segment_path(name))


def channel_entry_offset(handle, channel):
    """Where a channel's entry lives in the segment (struct dmb_channel)."""
    info = ffi.new("struct dmb_channel_info *")
    for index in range(handle.geo.channels):
        in_use = lib.dmb_channel_at(handle, index, info) == 1
        if in_use and ffi.string(info.name) == channel.encode():
            return handle.off_channels + index * 168
    raise AssertionError(channel)


def test_damaged_tables_are_shown_not_crashed_on(make_layer):
    layer = make_layer()
    layer.send_sync("inspect.broken", {"n": 1})
    layer.send_sync("inspect.named", {"n": 1})
    handle = layer._h
    broken = channel_entry_offset(handle, "inspect.broken")
    named = channel_entry_offset(handle, "inspect.named")
    name = layer.segment_name
    patch(name, broken + 4, struct.pack("<I", 0xFFFFFFF0))  # head: out of range
    patch(name, named + 64, b"\x1b[2J\xff")  # a name that would drive a terminal
    slots = handle.off_slots + 80 * 5  # a slot in use by pid -1
    patch(name, slots, struct.pack("<IIi", 1, 99, -1))

    code, out, err = run_main("--name", name)
    assert code == 0, err
    assert ESC not in out
    assert "\\x1b[2J" in out
    assert re.search(r"^\s+5\s+-1\s+dead\b", out, re.MULTILINE), out
    document = run_json("--name", name)
    assert {p["pid"]: p["alive"] for p in document["processes"]}[-1] is False
    code, out, err = run_main("--name", name, "--peek", "inspect.broken")
    assert code == 7
    assert "it is damaged" in err


@contextlib.contextmanager
def lock_held_by_a_stopped_sender(prefix, queued=0):
    """A process paused inside a send, holding the segment lock, after
    ``queued`` messages on inspect.stuck; SIGKILLed on the way out."""
    script = textwrap.dedent(f"""
        from dmb import SharedMemoryChannelLayer
        from dmb._ring_cffi import lib
        layer = SharedMemoryChannelLayer(prefix={prefix!r}, size={TEST_SIZE})
        for n in range({queued}):
            layer.send_sync("inspect.stuck", {{"n": n}})
        lib.dmb_test_crash_at(1, 2)  # pause inside the next send, lock held
        print("ready", flush=True)
        layer.send_sync("inspect.stuck", {{"n": -1}})
        """)
    holder = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "ready\n"
        time.sleep(0.3)  # the send reaches its crash point
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_a_stuck_lock_is_reported_within_the_timeout(prefix):
    with lock_held_by_a_stopped_sender(prefix):
        started = time.monotonic()
        result = run_cli("--prefix", prefix, "--timeout", "1")
        assert time.monotonic() - started < 10
        assert result.returncode == 7
        assert "no answer within 1s" in result.stderr
        (entry,) = [
            e
            for e in json.loads(run_cli("--json", "--timeout", "1").stdout)["segments"]
            if e["name"] == segment_name(prefix)
        ]
        assert entry["status"] == "locked"
    # The holder died with the lock: the next taker repairs, and we can read.
    document = run_json("--prefix", prefix)
    assert document["counters"]["repairs"] == 1
    assert [p["alive"] for p in document["processes"]] == [False]


@pytest.mark.parametrize("mode", [[], ["--purge", "inspect.stuck"]])
def test_ctrl_c_while_the_lock_is_stuck_exits_130_at_once(prefix, mode):
    with lock_held_by_a_stopped_sender(prefix, queued=1):
        tool = subprocess.Popen(
            [sys.executable, "-m", "dmb.inspect", "--prefix", prefix,
             "--timeout", "60", *mode],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        time.sleep(1.5)  # it waits for the lock
        assert tool.poll() is None
        interrupted = time.monotonic()
        tool.send_signal(signal.SIGINT)
        out, err = tool.communicate(timeout=30)
        # Not the 60 s of --timeout, and not 0: nothing was purged.
        assert time.monotonic() - interrupted < 10
        assert tool.returncode == 130, (out, err)
        assert "interrupted" in err
        assert "purged" not in out
    # The queued message is still there: the repair after the holder's
    # death keeps what was linked before it stopped.
    document = run_json("--prefix", prefix)
    (channel,) = [c for c in document["channels"] if c["name"] == "inspect.stuck"]
    assert channel["depth"] >= 1


def test_ctrl_c_during_a_read_keeps_the_mapping_until_the_read_ends(make_layer):
    """Ctrl-C in the middle of a read must not unmap under the read.

    The read thread may hold the segment lock; unmapping under it crashed
    the tool, and a lock whose holder's memory is gone is never marked
    dead, so every process of the site stalled on it.
    """
    layer = make_layer()
    name = layer.segment_name
    reader = dmb_inspect.SegmentReader(name)
    inside, release = threading.Event(), threading.Event()

    def read():
        inside.set()
        release.wait(30)  # a read that is still in the segment
        return reader.stats()

    def ctrl_c():
        inside.wait(30)
        time.sleep(0.1)  # the main thread is waiting for the read
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        dmb_inspect.guarded(read, 0.5, name)
    assert dmb_inspect._is_stuck(name)
    reader.close()  # must leave the mapping: the read is inside it
    release.set()
    assert wait_for(lambda: not dmb_inspect._is_stuck(name))
    # The read ended in a live mapping, and the lock is free for everyone.
    layer.send_sync("inspect.after", {"n": 1})
    assert asyncio.run(layer.receive("inspect.after")) == {"n": 1}
    reader.close()


# Permissions: the tool runs as another user (root ignores file modes).


def free_uid():
    import pwd

    used = {entry.pw_uid for entry in pwd.getpwall()}
    return next(uid for uid in range(52000, 60000) if uid not in used)


def run_as(uid, *args):
    """Run the tool in a forked child that has become ``uid``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result = run_main(*args)
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 65536):
        data += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another user")
def test_another_users_segment_is_permission_denied(make_layer):
    layer = make_layer()
    uid = free_uid()
    code, _, err = run_as(uid, "--name", layer.segment_name)
    assert code == 4
    assert "permission denied" in err and "mode 0600" in err
    assert run_as(uid, "--name", layer.segment_name, "--unlink")[0] == 4
    assert run_as(uid, "--name", layer.segment_name, "--unlink", "--force")[0] == 4
    assert os.path.exists(segment_path(layer.segment_name))
    code, out, _ = run_as(uid, "--json")
    listed = json.loads(out)
    assert code == 0
    assert all(e["name"] != layer.segment_name for e in listed["segments"])
    assert listed["unreadable"] >= 1


# Usage.


@pytest.mark.parametrize(
    "args",
    [
        ["--force"],
        ["--json", "--prometheus"],
        ["--peek", "x.y"],
        ["--unlink"],
        ["--members", "g"],
        ["--name", "not-a-segment"],
        ["--watch", "0"],
        ["--prefix", "a", "--name", "/dmb-0-a"],
        ["--prefix", "bad prefix"],
        ["--alias", "default"],
        ["--settings", "no_such_settings_module_here"],
        ["--list", "--peek", "x.y"],
        ["--bogus"],
        ["--prefix", "a", "--purge", "bad!x!y"],
        ["--prefix", "a", "--peek", "has space"],
        ["--prefix", "a\n"],
        ["--timeout", "inf"],
    ],
)
def test_usage_errors_exit_2(args):
    code, _, _ = run_main(*args)
    assert code == 2


def test_channel_layers_choose_the_dmb_alias():
    dmb_entry = {"BACKEND": "dmb.SharedMemoryChannelLayer", "CONFIG": {"prefix": "a1"}}
    other = {"BACKEND": "channels.layers.InMemoryChannelLayer"}
    several = {"one": dmb_entry, "two": dict(dmb_entry, CONFIG={"prefix": "b2"})}
    code, _, err = run_main(channel_layers={"default": other})
    assert code == 2 and "no CHANNEL_LAYERS entry uses dmb" in err
    code, _, err = run_main(channel_layers=several)
    assert code == 2 and "--alias" in err
    args = dmb_inspect.build_parser().parse_args(["--alias", "two"])
    assert dmb_inspect.target_name(args, several) == segment_name("b2")
    args = dmb_inspect.build_parser().parse_args([])
    assert dmb_inspect.target_name(args, {"x": other, "y": dmb_entry}) == segment_name(
        "a1"
    )
    args = dmb_inspect.build_parser().parse_args(["--list"])
    assert dmb_inspect.target_name(args, several) is None
    code, _, err = run_main("--alias", "two", "--uid", "7", channel_layers=several)
    assert code == 3 and segment_name("b2", 7) in err
    assert (
        run_main("--alias", "two", "--name", "/dmb-0-x", channel_layers=several)[0] == 2
    )


def test_a_shared_segment_is_found_by_its_prefix(make_layer):
    layer = make_layer(mode=0o660)
    assert layer.segment_name == segment_name(layer.prefix, shared=True)
    document = run_json("--prefix", layer.prefix)
    assert document["segment"]["name"] == layer.segment_name
    assert document["segment"]["mode"] == "0660"
    entry = {"BACKEND": "dmb.SharedMemoryChannelLayer"}
    entry["CONFIG"] = {"prefix": layer.prefix, "mode": 0o660}
    args = dmb_inspect.build_parser().parse_args([])
    assert dmb_inspect.target_name(args, {"default": entry}) == layer.segment_name
    entry["CONFIG"]["mode"] = "rw"
    assert run_main(channel_layers={"default": entry})[0] == 2


def test_help_lists_the_exit_codes():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "6 refused" in " ".join(result.stdout.split())
