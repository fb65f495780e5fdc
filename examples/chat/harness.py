"""What drives the chat example from outside: its servers and its clients.

The demo (demo.py, next to this file) and the end-to-end tests
(tests/e2e) both use it. It starts the servers, each in a session of its
own with its output collected, talks HTTP and websocket to them on
127.0.0.1 only, and removes the shared-memory segment at the end. Every
wait has a deadline and waits on an event (a new output line, a new
websocket frame); the one poll, for a port that does not accept
connections yet, retries until its deadline.
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

CHAT_DIR = Path(__file__).resolve().parent
PYTHON = sys.executable
DMB_BACKEND = "dmb.SharedMemoryChannelLayer"

# Lines the servers print once they are ready. uvicorn prints the first in
# each worker, also when the worker runs under gunicorn.
UVICORN_STARTED = re.compile(r"Started server process \[(\d+)\]")
RUNWORKER_READY = re.compile(r"Running worker for channels")


def backend():
    """The channel layer backend the example runs with."""
    return os.environ.get("CHAT_CHANNEL_BACKEND", DMB_BACKEND)


def chat_env(prefix, **extra):
    """Environment for the example's processes: its channel layer prefix."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="chatsite.settings",
        DMB_PREFIX=prefix,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uvicorn_argv(port, workers, graceful_timeout=5):
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
        # Channels' router has no lifespan handler; saying so spares a
        # warning per worker.
        "--lifespan",
        "off",
        "--no-access-log",
        "--timeout-graceful-shutdown",
        str(graceful_timeout),
        "chatsite.asgi:application",
    ]


def runworker_argv():
    return [PYTHON, "manage.py", "runworker", "jobs"]


class ServerProcess:
    """A server we started, in a session of its own, its output collected.

    A reader thread keeps every output line (also written to a log file) so
    that the caller can wait, with a deadline, for the line that says the
    server is ready, and can show the end of the log when something fails.
    `note` is called with a line of text if the server outlives a signal of
    stop() (by default, a logged warning).
    """

    def __init__(self, name, argv, env, log_dir, cwd=CHAT_DIR, note=None):
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self._note = note or logger.warning
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
            # Its own process group: stop() reaches the process and every
            # child it forked or spawned (uvicorn's workers), and nothing
            # else.
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

    def wait_for_matches(self, pattern, count=1, timeout=30.0):
        """(matches, True) once `pattern` matches `count` output lines.

        The matches are those of every line so far. (The matches so far,
        False) if the deadline passes or the process exits first.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for m in map(pattern.search, self._lines) if m]
                if len(found) >= count:
                    return found, True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    return found, False
                self._changed.wait(min(remaining, 0.5))

    def wait_for_lines(self, pattern, count=1, timeout=30.0):
        """Matches of `pattern` once there are `count` of them, else None."""
        found, ok = self.wait_for_matches(pattern, count, timeout)
        return found if ok else None

    async def await_lines(self, pattern, count=1, timeout=30.0):
        """wait_for_lines from a coroutine, without blocking the event loop."""
        return await asyncio.to_thread(self.wait_for_lines, pattern, count, timeout)

    def tail(self, n=40):
        """The last `n` output lines, each shown as `    name| line`."""
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
                    self._note(f"{self.name} still running after {sig.name}")
        # Workers whose parent is gone would still hold the port and the
        # segment: make sure none is left in the group.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._reader.join(timeout=5)
        return self.proc.returncode


def http_request(port, method, path, body=None, timeout=10.0):
    """(status, decoded JSON or text) of one request to the local site."""
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


def poll_http_ok(port, path="/healthz", timeout=30.0, interval=0.2):
    """(True, the JSON) of the first 200 answer to GET `path` in time.

    (False, the last status or error) if none came before the deadline.
    """
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            status, body = http_request(port, "GET", path, timeout=2)
            if status == 200:
                return True, body
            last = status
        except OSError as exc:
            last = exc
        # The port is not accepting yet: try again shortly.
        time.sleep(interval)
    return False, last


def wait_http_ok(port, path="/healthz", timeout=30.0, interval=0.2):
    """The JSON of the first 200 answer to GET `path`, else None."""
    ok, result = poll_http_ok(port, path, timeout, interval)
    return result if ok else None


async def open_room(port, room, timeout=10.0, close_timeout=3.0):
    """A websocket connection to `room` of the local site."""
    return await connect(
        f"ws://127.0.0.1:{port}/ws/rooms/{room}/",
        # The site only accepts handshakes from its own origin.
        origin=f"http://127.0.0.1:{port}",
        proxy=None,  # never route the local traffic through a proxy
        open_timeout=timeout,
        close_timeout=close_timeout,
        ping_interval=None,
    )


async def first_frame(ws, timeout=10.0):
    """The first frame of `ws`, decoded; `ws` is closed if it does not come."""
    try:
        return json.loads(await asyncio.wait_for(ws.recv(), timeout))
    except BaseException:
        await ws.close()
        raise


async def wait_until(predicate, changed, timeout):
    """Wait for predicate() to hold; False if the deadline passes first.

    `changed` is the event set whenever what the predicate looks at may
    have changed.
    """
    deadline = time.monotonic() + timeout
    while True:
        # Cleared before the check: a reader that sets it after the check
        # wakes the wait below, so no update is missed.
        changed.clear()
        if predicate():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(changed.wait(), remaining)
        except asyncio.TimeoutError:
            return predicate()


class RoomClient:
    """A websocket client in a room; a task reads what it receives.

    Each frame, decoded, goes to on_frame() with the time.time() it came
    at; then `changed` is set. `changed` may be shared by many clients, to
    wait for all of them at once. When the connection ends, `closed` and
    `changed` are set, and `close_reason` says why, if the server side
    closed it.
    """

    def __init__(self, ws, hello, changed=None):
        self.ws = ws
        self.pid = hello["pid"]
        self.changed = asyncio.Event() if changed is None else changed
        self.closed = asyncio.Event()
        self.close_reason = None
        self._task = asyncio.create_task(self._read())

    def on_frame(self, frame, received_at):
        """Take note of one frame; the subclasses say what they keep."""

    async def _read(self):
        try:
            async for raw in self.ws:
                received_at = time.time()
                self.on_frame(json.loads(raw), received_at)
                self.changed.set()
        except ConnectionClosed as exc:
            self.close_reason = exc
        finally:
            self.closed.set()
            self.changed.set()

    async def send_json(self, payload):
        await self.ws.send(json.dumps(payload))

    async def close(self):
        try:
            await asyncio.wait_for(self.ws.close(), 3)
        except (asyncio.TimeoutError, ConnectionClosed, OSError):
            pass
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def connect_spread(
    clients, open_one, want, pids, cap, timeout, connected=None
):
    """Connect clients one by one until there are `want` and all `pids` serve.

    Workers share one listening socket and the kernel wakes all of them for
    a new connection; on an idle machine the same worker tends to win every
    race, so a fresh server may put every connection on one worker. Before
    each connection, a client of the busiest worker sends a few messages to
    the room: while that worker relays them, an idle worker gets the next
    connection, as happens on a busy site. (Those messages carry no
    sequence number, so the counting of the demo and the tests ignores
    them.) Stops at `cap` clients or the deadline; the caller checks the
    spread it got.

    The clients are appended to `clients`, so that the caller has them all
    also if this is cut short. `await open_one(index, seconds left)` opens
    one, or returns None to have the loop try again; `connected(clients)`,
    if given, is called after each new one.
    """
    deadline = time.monotonic() + timeout
    while len(clients) < cap and time.monotonic() < deadline:
        if len(clients) >= want and set(pids) <= {c.pid for c in clients}:
            break
        if clients:
            busiest = Counter(c.pid for c in clients).most_common(1)[0][0]
            talker = next(c for c in clients if c.pid == busiest)
            for _ in range(3):
                await talker.send_json({"type": "chat", "text": "warming up"})
        client = await open_one(len(clients), max(1.0, deadline - time.monotonic()))
        if client is None:
            continue
        clients.append(client)
        if connected is not None:
            connected(clients)
    return clients


def remove_segment(prefix):
    """Remove the segment of `prefix` (no error if absent); its name."""
    from dmb.segment import segment_name, unlink_segment

    name = segment_name(prefix)
    unlink_segment(name)
    return name
