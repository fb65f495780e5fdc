"""Shared pieces of the end-to-end tests: real servers, real websocket clients.

Everything here talks to 127.0.0.1 only. Every wait has a deadline and
waits on an event (a new output line, a new websocket frame); the one poll,
for a port that does not accept connections yet, retries until its
deadline. No test sleeps a fixed time and then asserts.
"""

import asyncio
import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CHAT_DIR = REPO / "examples" / "chat"
PYTHON = sys.executable
DMB_BACKEND = "dmb.SharedMemoryChannelLayer"

# Lines the servers print once they are ready. uvicorn prints the first in
# each worker, also when the worker runs under gunicorn.
UVICORN_STARTED = re.compile(r"Started server process \[(\d+)\]")
DAPHNE_LISTENING = re.compile(r"Listening on TCP address 127\.0\.0\.1:(\d+)")
RUNWORKER_READY = re.compile(r"Running worker for channels")


def backend():
    """The channel layer backend the example runs with in these tests."""
    return os.environ.get("CHAT_CHANNEL_BACKEND", DMB_BACKEND)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_env(prefix, **extra):
    """Environment for one test's processes: its own channel layer prefix."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="chatsite.settings",
        DMB_PREFIX=prefix,
        # A small segment is plenty for a test and spares /dev/shm.
        DMB_SIZE=str(8 * 1024 * 1024),
        CHAT_JOB_STEP_SECONDS="0.2",
        PYTHONUNBUFFERED="1",
        # Clients and servers here never go through a proxy.
        NO_PROXY="127.0.0.1,localhost",
    )
    env.update(extra)
    return env


class ServerProcess:
    """A server we started, in a session of its own, its output collected.

    A reader thread keeps every output line (also written to a log file) so
    that a test can wait, with a deadline, for the line that says the server
    is ready, and can show the end of the log when it fails.
    """

    def __init__(self, name, argv, env, log_dir, cwd=CHAT_DIR):
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self._lines = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Its own process group: stop() reaches the workers too, and
            # nothing else.
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        with open(self.log_path, "w", encoding="utf-8") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                with self._changed:
                    self._lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_lines(self, pattern, count=1, timeout=30.0):
        """The first `count` matches of `pattern` in the output.

        Raises AssertionError, with the end of the log, if they do not
        appear before the deadline or the process exits first.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for m in map(pattern.search, self._lines) if m]
                if len(found) >= count:
                    return found[:count]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    break
                self._changed.wait(min(remaining, 0.5))
        state = f"exit code {self.proc.poll()}" if self.proc.poll() is not None else ""
        raise AssertionError(
            f"{self.name}: {count} line(s) matching {pattern.pattern!r} did not "
            f"appear within {timeout}s (found {len(found)}) {state}\n{self.tail()}"
        )

    async def await_lines(self, pattern, count=1, timeout=30.0):
        """wait_for_lines from a coroutine, without blocking the event loop."""
        return await asyncio.to_thread(self.wait_for_lines, pattern, count, timeout)

    def tail(self, n=40):
        with self._changed:
            lines = self._lines[-n:]
        return "\n".join(f"    {self.name}| {line}" for line in lines)

    def in_our_group(self, pid):
        """True if `pid` is a live process of this server's process group."""
        try:
            return os.getpgid(pid) == self.pid
        except ProcessLookupError:
            return False

    def stop(self, term_timeout=10.0, kill_timeout=5.0):
        """SIGTERM the process group; SIGKILL whatever outlives the deadline."""
        if self.proc.poll() is None:
            for sig, timeout in (
                (signal.SIGTERM, term_timeout),
                (signal.SIGKILL, kill_timeout),
            ):
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    logger.warning("%s outlived %s", self.name, sig.name)
        # Workers whose parent is gone would still hold the port and the
        # segment: make sure none is left in the group.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._reader.join(timeout=5)
        return self.proc.returncode


def uvicorn_argv(port, workers):
    return [
        PYTHON,
        "-m",
        "uvicorn",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--lifespan",
        "off",
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "3",
        "chatsite.asgi:application",
    ]


def gunicorn_argv(port, workers, config_file=None):
    config = ["--config", str(config_file)] if config_file else []
    return [
        PYTHON,
        "-m",
        "gunicorn",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        "uvicorn.workers.UvicornWorker",
        "--preload",
        "--graceful-timeout",
        "3",
        *config,
        "chatsite.asgi:application",
    ]


def daphne_argv(port):
    return [
        PYTHON,
        "-m",
        "daphne",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "chatsite.asgi:application",
    ]


def runworker_argv():
    return [PYTHON, "manage.py", "runworker", "jobs"]


def http_request(port, method, path, body=None, timeout=10.0):
    """(status, JSON body or text) of one request to the local server."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        payload = response.read().decode()
        try:
            return response.status, json.loads(payload)
        except ValueError:
            return response.status, payload
    finally:
        conn.close()


def wait_http_ok(port, path="/healthz", timeout=30.0):
    """The JSON of the first 200 answer to GET `path`, before the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            status, body = http_request(port, "GET", path, timeout=2)
            if status == 200:
                return body
            last = status
        except OSError as exc:
            last = exc
        # The port is not accepting yet: try again shortly.
        time.sleep(0.1)
    raise AssertionError(
        f"GET {path} on port {port} not OK within {timeout}s: {last!r}"
    )


class ChatClient:
    """A websocket client of the chat, and every frame it has received."""

    def __init__(self, ws, hello, name):
        self.ws = ws
        self.hello_at = time.monotonic()
        self.pid = hello["pid"]
        self.name = name
        self.frames = []
        # Unique (tag, sender, seq) of chat messages, a count of them per tag
        # so that waiting on "all N messages of round X" is cheap, and a
        # count of every chat frame per tag, duplicates included.
        self.chat_keys = set()
        self.chat_counts = Counter()
        self.chat_frames = Counter()
        self.changed = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_reason = None
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, port, room, name, timeout=10.0):
        try:
            ws = await connect(
                f"ws://127.0.0.1:{port}/ws/rooms/{room}/",
                # The site only accepts handshakes from its own origin.
                origin=f"http://127.0.0.1:{port}",
                proxy=None,
                open_timeout=timeout,
                close_timeout=2,
                ping_interval=None,
            )
        except asyncio.TimeoutError:
            # The TCP connection was accepted but the consumer never
            # accepted the websocket: the worker that took it is stuck.
            raise AssertionError(
                f"client {name}: no websocket handshake from 127.0.0.1:{port} "
                f"within {timeout}s"
            ) from None
        try:
            hello = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        except BaseException:
            await ws.close()
            raise
        assert hello.get("type") == "hello", hello
        return cls(ws, hello, name)

    async def _read(self):
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                self.frames.append(frame)
                if frame.get("type") == "chat" and "seq" in frame:
                    key = (tag_of(frame), frame["sender"], frame["seq"])
                    self.chat_frames[key[0]] += 1
                    if key not in self.chat_keys:
                        self.chat_keys.add(key)
                        self.chat_counts[key[0]] += 1
                self.changed.set()
        except ConnectionClosed as exc:
            self.close_reason = exc
        finally:
            self.closed.set()
            self.changed.set()

    async def send_chat(self, tag, seq, text=None):
        # The room relays only the fields it knows, so the round's tag
        # travels at the start of the text (see tag_of).
        await self.ws.send(
            json.dumps(
                {
                    "type": "chat",
                    "sender": self.name,
                    "seq": seq,
                    "text": text or f"{tag}|{self.name}|{seq}",
                    "ts": time.time(),
                }
            )
        )

    async def send_json(self, payload):
        await self.ws.send(json.dumps(payload))

    async def wait_for(self, predicate, timeout):
        """Wait until predicate(self) holds; False once the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            # Clear, then check: a frame arriving after the check sets the
            # event again, so the wait below cannot miss it.
            self.changed.clear()
            if predicate(self):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except asyncio.TimeoutError:
                return predicate(self)

    def of_type(self, kind):
        return [f for f in self.frames if f.get("type") == kind]

    async def close(self):
        try:
            await asyncio.wait_for(self.ws.close(), 3)
        except (asyncio.TimeoutError, ConnectionClosed, OSError):
            pass
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def tag_of(frame):
    """The round tag a chat frame was sent with (see ChatClient.send_chat)."""
    return frame.get("text", "").split("|", 1)[0]


async def wait_all(clients, predicate, timeout):
    """The clients for which predicate did not hold by the shared deadline."""
    results = await asyncio.gather(*(c.wait_for(predicate, timeout) for c in clients))
    return [c for c, ok in zip(clients, results) if not ok]


async def connect_spread(port, room, want, pids, cap, timeout=30.0, prefix="c"):
    """Connect clients one by one until there are `want` and all `pids` serve.

    Workers share one listening socket and the kernel wakes all of them for
    a new connection; on an idle machine the same worker tends to win every
    race, so a fresh server may put every connection on one worker. Before
    each connection, a client of the busiest worker sends a few messages to
    the room: while that worker relays them, an idle worker gets the next
    connection. (Those messages carry no sequence number, so the counting
    in ChatClient ignores them.) Stops at `cap` clients or the deadline; the
    caller checks the spread it got.
    """
    clients = []
    deadline = time.monotonic() + timeout
    while len(clients) < cap and time.monotonic() < deadline:
        if len(clients) >= want and set(pids) <= {c.pid for c in clients}:
            break
        if clients:
            busiest = Counter(c.pid for c in clients).most_common(1)[0][0]
            talker = next(c for c in clients if c.pid == busiest)
            for _ in range(3):
                await talker.send_json({"type": "chat", "text": "warming up"})
        name = f"{prefix}{len(clients)}"
        remaining = max(1.0, deadline - time.monotonic())
        try:
            client = await ChatClient.connect(port, room, name, min(10, remaining))
        except BaseException:
            await asyncio.gather(*(c.close() for c in clients))
            raise
        clients.append(client)
    return clients


async def chat_round(senders, receivers, tag, per_sender, timeout, interval=0.02):
    """Each sender sends `per_sender` messages; returns what went wrong.

    The result maps each receiver that did not get every message of the
    round by the deadline to the keys it lacks, and each receiver that got a
    message twice to how many frames it got; empty means each message
    arrived exactly once.
    """
    expected = {(tag, s.name, seq) for s in senders for seq in range(per_sender)}

    async def talk(sender):
        for seq in range(per_sender):
            await sender.send_chat(tag, seq)
            await asyncio.sleep(interval)

    await asyncio.gather(*(talk(s) for s in senders))
    late = await wait_all(
        receivers, lambda c: c.chat_counts[tag] >= len(expected), timeout
    )
    problems = {
        c.name: sorted(expected - {k for k in c.chat_keys if k[0] == tag}) for c in late
    }
    for c in receivers:
        if c.chat_frames[tag] > len(expected):
            problems[c.name] = f"{c.chat_frames[tag]} frames for {len(expected)}"
    return problems


def spread(clients):
    """{pid: number of clients} for a summary in assertion messages."""
    return dict(Counter(c.pid for c in clients))


def unlink_segment(prefix):
    """Remove the test's shared-memory segment (no error if absent)."""
    if backend() != DMB_BACKEND:
        return
    from dmb.segment import segment_name
    from dmb.segment import unlink_segment as unlink

    unlink(segment_name(prefix))
