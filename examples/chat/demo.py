#!/usr/bin/env python
"""Run the chat example end to end on this host and report what happened.

    python examples/chat/demo.py [--clients 40] [--messages 5] [--workers 4]

What it does, in order:

1. starts ``uvicorn --workers N`` on 127.0.0.1 (a free port) and one
   ``python manage.py runworker jobs``, each in its own session, with their
   output in a temporary log directory;
2. waits until every uvicorn worker has started and the site answers HTTP;
3. connects websocket clients to one room, one at a time so that the
   workers share them, until it has ``--clients`` of them and every worker
   serves at least one (or a cap is reached, and then it reports the spread);
4. every client sends ``--messages`` numbered, time-stamped messages; every
   client must receive every message of the room;
5. calls the ``announce`` HTTP view once and asks the job worker for one job;
   every client must receive the announcement and every progress report;
6. prints a summary, stops the servers (SIGTERM, then SIGKILL after a
   deadline), removes the shared-memory segment, and exits 0 only if every
   message arrived.

Every wait has a deadline. Use the Python of the environment where the
example's requirements (Django, Channels, uvicorn, websockets, dmb) are
installed.
"""

import argparse
import asyncio
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

CHAT_DIR = Path(__file__).resolve().parent
DMB_BACKEND = "dmb.SharedMemoryChannelLayer"
STARTED_RE = re.compile(r"Started server process \[(\d+)\]")
RUNWORKER_RE = re.compile(r"Running worker for channels")
_T0 = time.monotonic()


def say(text):
    """A progress line, with the seconds since the demo started."""
    print(f"[{time.monotonic() - _T0:6.2f}s] {text}", flush=True)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, fraction):
    """The value below which `fraction` of the sorted values fall (nearest)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


class Service:
    """One server process we started, its output copied to a log file.

    A thread reads the process's output line by line so that the demo can
    wait, with a deadline, for a line that says it is ready.
    """

    def __init__(self, name, argv, env, log_dir):
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self._lines = []
        self._changed = threading.Condition()
        # A session of its own: the SIGTERM/SIGKILL at the end reaches the
        # process and every child it forked or spawned (uvicorn's workers).
        self.proc = subprocess.Popen(
            argv,
            cwd=CHAT_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
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

    def wait_for_lines(self, pattern, count, timeout):
        """Matches of `pattern` once there are `count` of them, else None."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for m in map(pattern.search, self._lines) if m]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    return None
                self._changed.wait(min(remaining, 0.5))

    def tail(self, n=15):
        with self._changed:
            return self._lines[-n:]

    def stop(self, term_timeout=10.0, kill_timeout=5.0):
        """SIGTERM the process group, SIGKILL it if it outlives the deadline."""
        if self.proc.poll() is None:
            for sig, timeout in (
                (signal.SIGTERM, term_timeout),
                (signal.SIGKILL, kill_timeout),
            ):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    say(f"{self.name} still running after {sig.name}")
        # Children that outlived their parent would keep the group alive.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._reader.join(timeout=5)
        return self.proc.returncode


def http_request(port, method, path, body=None, timeout=10.0):
    """(status, decoded JSON or text) of one request to the local site."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        payload = response.read().decode()
        try:
            return response.status, json.loads(payload)
        except ValueError:
            return response.status, payload
    finally:
        conn.close()


def wait_http_ok(port, path, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, body = http_request(port, "GET", path, timeout=2)
            if status == 200:
                return body
        except OSError:
            pass
        time.sleep(0.2)
    return None


class Client:
    """One websocket client in the room and what it has received."""

    def __init__(self, index, ws, hello, changed):
        self.index = index
        self.ws = ws
        self.pid = hello["pid"]
        self.chats = set()  # (sender index, seq) pairs received
        self.latencies = []
        self.announcements = []
        self.job_steps = {}  # job id -> set of step numbers seen
        self.lost = None  # why the server side closed the connection, if it did
        self._changed = changed
        self.task = asyncio.create_task(self._read())

    async def _read(self):
        try:
            async for raw in self.ws:
                now = time.time()
                msg = json.loads(raw)
                kind = msg.get("type")
                if kind == "chat" and "seq" in msg:
                    self.chats.add((msg["sender"], msg["seq"]))
                    self.latencies.append(now - msg["ts"])
                elif kind == "announce":
                    self.announcements.append(msg["text"])
                elif kind == "job":
                    self.job_steps.setdefault(msg["job"], set()).add(msg["step"])
                self._changed.set()
        except ConnectionClosed as exc:
            self.lost = exc
        finally:
            self._changed.set()

    async def send(self, payload):
        await self.ws.send(json.dumps(payload))

    async def close(self):
        try:
            await asyncio.wait_for(self.ws.close(), 3)
        except (asyncio.TimeoutError, ConnectionClosed, OSError):
            pass
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def wait_until(predicate, changed, timeout):
    """Wait for predicate() to hold; False if the deadline passes first."""
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


async def open_client(index, url, origin, changed):
    ws = await connect(
        url,
        origin=origin,
        proxy=None,  # never route the local traffic through a proxy
        open_timeout=10,
        close_timeout=3,
        ping_interval=None,
    )
    try:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
    except BaseException:
        await ws.close()
        raise
    if hello.get("type") != "hello":
        await ws.close()
        raise RuntimeError(f"first frame was not a hello: {hello!r}")
    return Client(index, ws, hello, changed)


async def connect_clients(args, port, worker_pids, changed, clients):
    """Connect until there are enough clients and every worker serves one.

    The workers share one listening socket. The kernel wakes all of them for
    a new connection and, on an idle machine, the same worker tends to win
    every race. So connections are opened one after the other, and before
    each one a client of the busiest worker sends a few unnumbered messages
    to the room (the counting ignores them): while that worker relays them,
    an idle one takes the next connection, as happens on a busy site.
    """
    url = f"ws://127.0.0.1:{port}/ws/rooms/{args.room}/"
    origin = f"http://127.0.0.1:{port}"
    cap = args.clients * 3
    deadline = time.monotonic() + args.connect_timeout
    while len(clients) < cap and time.monotonic() < deadline:
        used = {c.pid for c in clients}
        if len(clients) >= args.clients and used >= worker_pids:
            break
        if clients:
            busiest = max(used, key=lambda pid: sum(c.pid == pid for c in clients))
            talker = next(c for c in clients if c.pid == busiest)
            for _ in range(3):
                await talker.send({"type": "chat", "text": "warming up"})
        try:
            clients.append(await open_client(len(clients), url, origin, changed))
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
            say(f"a connection failed: {exc!r}; retrying")
            await asyncio.sleep(0.2)
            continue
        if len(clients) % 10 == 0:
            say(
                f"{len(clients)} clients connected, "
                f"workers used: {len({c.pid for c in clients})}"
            )


async def exchange(args, port, worker_pids, results):
    """Run the three exchanges, filling `results` as it goes.

    `results` is filled in place so that whatever was measured, and every
    client to close, is still there if the overall deadline cuts this short.
    """
    changed = asyncio.Event()
    clients = results["clients"]
    await connect_clients(args, port, worker_pids, changed, clients)
    if not clients:
        return
    used = {c.pid for c in clients}
    say(
        f"{len(clients)} clients connected over {len(used)} of "
        f"{len(worker_pids)} workers"
    )

    # Chat: every client sends its numbered messages, spread out in time so
    # that the room sees a steady stream instead of one burst.
    n = len(clients)
    expected_chat = n * n * args.messages

    async def talk(client):
        await asyncio.sleep(random.uniform(0, args.interval))
        for seq in range(args.messages):
            await client.send(
                {
                    "type": "chat",
                    "sender": str(client.index),
                    "seq": seq,
                    "text": f"message {seq} from client {client.index}",
                    "ts": time.time(),
                }
            )
            await asyncio.sleep(args.interval)

    def delivered():
        return sum(len(c.chats) for c in clients)

    say(f"{n} clients each send {args.messages} messages to room {args.room!r}")
    started = time.monotonic()
    senders = asyncio.gather(*(talk(c) for c in clients), return_exceptions=True)
    ok = await wait_until(
        lambda: delivered() >= expected_chat,
        changed,
        args.messages * args.interval + args.delivery_timeout,
    )
    sent = await asyncio.wait_for(senders, 10)
    errors = [s for s in sent if isinstance(s, BaseException)]
    if errors:
        say(f"{len(errors)} clients failed to send: {errors[0]!r}")
    results["chat"] = (delivered(), expected_chat, time.monotonic() - started)
    say(f"chat: {delivered()}/{expected_chat} deliveries" + ("" if ok else " (late)"))

    # Announce through the plain Django view, over HTTP.
    text = f"announcement at {time.time():.3f}"
    status, body = await asyncio.to_thread(
        http_request, port, "POST", f"/rooms/{args.room}/announce", {"text": text}
    )
    pid = body.get("pid", "?") if isinstance(body, dict) else "?"
    say(f"announce view answered {status} from pid {pid}")
    await wait_until(
        lambda: all(text in c.announcements for c in clients),
        changed,
        args.delivery_timeout,
    )
    results["announce"] = (sum(text in c.announcements for c in clients), n)
    say(f"announce: {results['announce'][0]}/{n} clients")

    # A job on the "jobs" channel: the runworker process does the work and
    # reports each step to the room.
    job = f"demo-{os.getpid()}"
    steps = set(range(1, args.job_steps + 1))
    requester = next((c for c in clients if c.lost is None), None)
    if requester is None:
        say("no connection left to ask for a job")
        return
    await requester.send({"type": "job", "job": job, "steps": args.job_steps})
    say(f"job {job} queued ({args.job_steps} steps)")
    await wait_until(
        lambda: all(c.job_steps.get(job, set()) >= steps for c in clients),
        changed,
        args.job_steps * 2 + args.delivery_timeout,
    )
    got = sum(len(c.job_steps.get(job, set()) & steps) for c in clients)
    results["job"] = (got, n * len(steps))
    say(f"job: {got}/{n * len(steps)} progress reports delivered")


async def run_clients(args, port, worker_pids):
    results = {"clients": []}
    try:
        await asyncio.wait_for(
            exchange(args, port, worker_pids, results), args.overall_timeout
        )
    except asyncio.TimeoutError:
        say("the client side ran out of time")
    except ConnectionClosed as exc:
        say(f"a connection was lost and the run cannot go on: {exc!r}")
    finally:
        await asyncio.gather(
            *(c.close() for c in results["clients"]), return_exceptions=True
        )
    return results


def summarize(results, worker_pids):
    clients = results.get("clients", [])
    print()
    print("=== summary ===")
    per_pid = {}
    for c in clients:
        per_pid[c.pid] = per_pid.get(c.pid, 0) + 1
    print(f"clients: {len(clients)}")
    for pid in sorted(worker_pids | set(per_pid)):
        print(f"  worker pid {pid}: {per_pid.get(pid, 0)} clients")
    all_ok = bool(clients)
    for key, label in (
        ("chat", "chat messages"),
        ("announce", "announcements"),
        ("job", "job progress"),
    ):
        if key not in results:
            print(f"{label}: not run")
            all_ok = False
            continue
        got, expected = results[key][:2]
        print(f"{label} delivered: {got}/{expected}")
        all_ok = all_ok and got == expected
    latencies = [x for c in clients for x in c.latencies]
    if latencies:
        print(
            f"chat latency: p50 {percentile(latencies, 0.50) * 1000:.1f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms over {len(latencies)} deliveries"
        )
    if "chat" in results and results["chat"][2] > 0:
        print(f"chat phase: {results['chat'][2]:.2f} s")
    unused = worker_pids - set(per_pid)
    if unused:
        print(f"note: workers {sorted(unused)} served no client")
    lost = [c for c in clients if c.lost is not None]
    if lost:
        print(f"connections lost before the end: {len(lost)} ({lost[0].lost!r})")
        all_ok = False
    print(f"result: {'OK' if all_ok else 'FAILED'}")
    return all_ok


def describe_exit(code):
    if code is not None and code < 0:
        return f"ended by {signal.Signals(-code).name}"
    return f"exit code {code}"


def remove_segment(prefix):
    from dmb.segment import segment_name, unlink_segment

    name = segment_name(prefix)
    unlink_segment(name)
    say(f"removed shared-memory segment {name}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=40)
    p.add_argument("--messages", type=int, default=5, help="per client")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--interval", type=float, default=0.5, help="between sends")
    p.add_argument("--job-steps", type=int, default=4)
    p.add_argument("--room", default="demo")
    p.add_argument("--prefix", help="channel layer prefix (default: unique)")
    p.add_argument("--startup-timeout", type=float, default=60)
    p.add_argument("--connect-timeout", type=float, default=60)
    p.add_argument("--delivery-timeout", type=float, default=20)
    p.add_argument("--overall-timeout", type=float, default=180)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Turn SIGTERM into an exception, so that the clean-up below (stopping
    # the servers, removing the segment) also runs when the demo is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    prefix = args.prefix or f"demo{os.getpid()}"
    backend = os.environ.get("CHAT_CHANNEL_BACKEND", DMB_BACKEND)
    port = free_port()
    log_dir = tempfile.mkdtemp(prefix="dmb-chat-demo-")
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="chatsite.settings",
        DMB_PREFIX=prefix,
        CHAT_JOB_STEP_SECONDS="0.3",
        PYTHONUNBUFFERED="1",
    )
    say(f"backend {backend}, prefix {prefix!r}, port {port}, logs in {log_dir}")

    services = []
    ok = False
    try:
        uvicorn = Service(
            "uvicorn",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(args.workers),
                # Channels' router has no lifespan handler; saying so spares
                # a warning per worker.
                "--lifespan",
                "off",
                "--no-access-log",
                "--timeout-graceful-shutdown",
                "5",
                "chatsite.asgi:application",
            ],
            env,
            log_dir,
        )
        services.append(uvicorn)
        worker = Service(
            "runworker",
            [sys.executable, "manage.py", "runworker", "jobs"],
            env,
            log_dir,
        )
        services.append(worker)
        say(
            f"started uvicorn (pid {uvicorn.proc.pid}) and runworker "
            f"(pid {worker.proc.pid})"
        )

        started = uvicorn.wait_for_lines(STARTED_RE, args.workers, args.startup_timeout)
        if started is None:
            say("uvicorn workers did not all start in time")
            return 1
        worker_pids = {int(m.group(1)) for m in started}
        say(f"uvicorn workers up: {sorted(worker_pids)}")
        if wait_http_ok(port, "/healthz", args.startup_timeout) is None:
            say("the site did not answer HTTP in time")
            return 1
        if worker.wait_for_lines(RUNWORKER_RE, 1, args.startup_timeout) is None:
            say("runworker did not start in time")
            return 1
        say("runworker listening on channel 'jobs'")

        results = asyncio.run(run_clients(args, port, worker_pids))
        ok = summarize(results, worker_pids)
        return 0 if ok else 1
    finally:
        for service in reversed(services):
            say(f"stopped {service.name} ({describe_exit(service.stop())})")
            if not ok:
                for line in service.tail():
                    print(f"    {service.name}| {line}")
        if backend == DMB_BACKEND:
            remove_segment(prefix)


if __name__ == "__main__":
    sys.exit(main())
