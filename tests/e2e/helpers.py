"""Shared pieces of the end-to-end tests: real servers, real websocket clients.

The servers and the clients are those of the chat example's harness
(examples/chat/harness.py, which its demo uses too). What is here is what
the tests add: waits that fail the test, with the end of the log, when
their deadline passes, and clients that count what they receive.

Everything here talks to 127.0.0.1 only. Every wait has a deadline and
waits on an event (a new output line, a new websocket frame); the one poll,
for a port that does not accept connections yet, retries until its
deadline. No test sleeps a fixed time and then asserts.
"""

import asyncio
import re
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHAT_DIR = REPO / "examples" / "chat"
# The harness lives next to the demo, which imports it from its own folder.
if str(CHAT_DIR) not in sys.path:
    sys.path.insert(0, str(CHAT_DIR))

import harness
from harness import (
    DMB_BACKEND,
    PYTHON,
    RUNWORKER_READY,
    UVICORN_STARTED,
    backend,
    free_port,
    http_request,
    runworker_argv,
)

# What the tests use, the harness's names among them.
__all__ = [
    "CHAT_DIR",
    "DAPHNE_LISTENING",
    "DMB_BACKEND",
    "PYTHON",
    "REPO",
    "RUNWORKER_READY",
    "UVICORN_STARTED",
    "ChatClient",
    "ServerProcess",
    "backend",
    "chat_env",
    "chat_round",
    "connect_spread",
    "daphne_argv",
    "free_port",
    "gunicorn_argv",
    "http_request",
    "runworker_argv",
    "spread",
    "tag_of",
    "unlink_segment",
    "uvicorn_argv",
    "wait_all",
    "wait_http_ok",
]

DAPHNE_LISTENING = re.compile(r"Listening on TCP address 127\.0\.0\.1:(\d+)")


def chat_env(prefix, **extra):
    """Environment for one test's processes: its own channel layer prefix."""
    return harness.chat_env(
        prefix,
        **{
            # A small segment is plenty for a test and spares /dev/shm.
            "DMB_SIZE": str(8 * 1024 * 1024),
            "CHAT_JOB_STEP_SECONDS": "0.2",
            # Clients and servers here never go through a proxy.
            "NO_PROXY": "127.0.0.1,localhost",
            **extra,
        },
    )


class ServerProcess(harness.ServerProcess):
    """A server we started (see harness.ServerProcess); its waits assert."""

    def wait_for_lines(self, pattern, count=1, timeout=30.0):
        """The first `count` matches of `pattern` in the output.

        Raises AssertionError, with the end of the log, if they do not
        appear before the deadline or the process exits first.
        """
        found, ok = self.wait_for_matches(pattern, count, timeout)
        if ok:
            return found[:count]
        state = f"exit code {self.proc.poll()}" if self.proc.poll() is not None else ""
        raise AssertionError(
            f"{self.name}: {count} line(s) matching {pattern.pattern!r} did not "
            f"appear within {timeout}s (found {len(found)}) {state}\n{self.tail()}"
        )


def uvicorn_argv(port, workers):
    return harness.uvicorn_argv(port, workers, graceful_timeout=3)


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


def wait_http_ok(port, path="/healthz", timeout=30.0):
    """The JSON of the first 200 answer to GET `path`, before the deadline."""
    ok, result = harness.poll_http_ok(port, path, timeout, interval=0.1)
    if ok:
        return result
    raise AssertionError(
        f"GET {path} on port {port} not OK within {timeout}s: {result!r}"
    )


class ChatClient(harness.RoomClient):
    """A websocket client of the chat, and every frame it has received."""

    def __init__(self, ws, hello, name):
        super().__init__(ws, hello)
        self.hello_at = time.monotonic()
        self.name = name
        self.frames = []
        # Unique (tag, sender, seq) of chat messages, a count of them per tag
        # so that waiting on "all N messages of round X" is cheap, and a
        # count of every chat frame per tag, duplicates included.
        self.chat_keys = set()
        self.chat_counts = Counter()
        self.chat_frames = Counter()

    @classmethod
    async def connect(cls, port, room, name, timeout=10.0):
        try:
            ws = await harness.open_room(port, room, timeout, close_timeout=2)
        except asyncio.TimeoutError:
            # The TCP connection was accepted but the consumer never
            # accepted the websocket: the worker that took it is stuck.
            raise AssertionError(
                f"client {name}: no websocket handshake from 127.0.0.1:{port} "
                f"within {timeout}s"
            ) from None
        hello = await harness.first_frame(ws, timeout)
        assert hello.get("type") == "hello", hello
        return cls(ws, hello, name)

    def on_frame(self, frame, received_at):
        self.frames.append(frame)
        if frame.get("type") == "chat" and "seq" in frame:
            key = (tag_of(frame), frame["sender"], frame["seq"])
            self.chat_frames[key[0]] += 1
            if key not in self.chat_keys:
                self.chat_keys.add(key)
                self.chat_counts[key[0]] += 1

    async def send_chat(self, tag, seq, text=None):
        # The room relays only the fields it knows, so the round's tag
        # travels at the start of the text (see tag_of).
        await self.send_json(
            {
                "type": "chat",
                "sender": self.name,
                "seq": seq,
                "text": text or f"{tag}|{self.name}|{seq}",
                "ts": time.time(),
            }
        )

    async def wait_for(self, predicate, timeout):
        """Wait until predicate(self) holds; False once the deadline passes."""
        return await harness.wait_until(lambda: predicate(self), self.changed, timeout)

    def of_type(self, kind):
        return [f for f in self.frames if f.get("type") == kind]


def tag_of(frame):
    """The round tag a chat frame was sent with (see ChatClient.send_chat)."""
    return frame.get("text", "").split("|", 1)[0]


async def wait_all(clients, predicate, timeout):
    """The clients for which predicate did not hold by the shared deadline."""
    results = await asyncio.gather(*(c.wait_for(predicate, timeout) for c in clients))
    return [c for c, ok in zip(clients, results) if not ok]


async def connect_spread(port, room, want, pids, cap, timeout=30.0, prefix="c"):
    """Connect clients one by one until there are `want` and all `pids` serve.

    See harness.connect_spread. Stops at `cap` clients or the deadline; the
    caller checks the spread it got. If a connection fails, the clients
    connected so far are closed and the error is raised.
    """
    clients = []

    async def open_one(index, seconds_left):
        name = f"{prefix}{index}"
        try:
            return await ChatClient.connect(port, room, name, min(10, seconds_left))
        except BaseException:
            await asyncio.gather(*(c.close() for c in clients))
            raise

    return await harness.connect_spread(clients, open_one, want, pids, cap, timeout)


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
    harness.remove_segment(prefix)
