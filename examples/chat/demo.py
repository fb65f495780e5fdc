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
installed. The servers and clients are driven by harness.py, next to this
file, which the end-to-end tests use too.
"""

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import time

from harness import (
    DMB_BACKEND,
    RUNWORKER_READY,
    UVICORN_STARTED,
    RoomClient,
    ServerProcess,
    backend,
    chat_env,
    connect_spread,
    first_frame,
    free_port,
    http_request,
    open_room,
    remove_segment,
    runworker_argv,
    uvicorn_argv,
    wait_http_ok,
    wait_until,
)
from websockets.exceptions import ConnectionClosed, InvalidHandshake

_T0 = time.monotonic()


def say(text):
    """A progress line, with the seconds since the demo started."""
    print(f"[{time.monotonic() - _T0:6.2f}s] {text}", flush=True)


def percentile(values, fraction):
    """The value below which `fraction` of the sorted values fall (nearest)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


class Client(RoomClient):
    """One websocket client in the room and what it has received."""

    def __init__(self, index, ws, hello, changed):
        super().__init__(ws, hello, changed)
        self.index = index
        self.chats = set()  # (sender index, seq) pairs received
        self.latencies = []
        self.announcements = []
        self.job_steps = {}  # job id -> set of step numbers seen

    def on_frame(self, msg, received_at):
        kind = msg.get("type")
        if kind == "chat" and "seq" in msg:
            self.chats.add((msg["sender"], msg["seq"]))
            self.latencies.append(received_at - msg["ts"])
        elif kind == "announce":
            self.announcements.append(msg["text"])
        elif kind == "job":
            self.job_steps.setdefault(msg["job"], set()).add(msg["step"])


async def open_client(index, port, room, changed):
    ws = await open_room(port, room, timeout=10)
    hello = await first_frame(ws, 10)
    if hello.get("type") != "hello":
        await ws.close()
        raise RuntimeError(f"first frame was not a hello: {hello!r}")
    return Client(index, ws, hello, changed)


async def connect_clients(args, port, worker_pids, changed, clients):
    """Connect until there are enough clients and every worker serves one.

    The workers share one listening socket, so connections are opened one
    after the other, spread over the workers (see harness.connect_spread).
    A connection that fails is tried again.
    """

    async def open_one(index, _seconds_left):
        try:
            return await open_client(index, port, args.room, changed)
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
            say(f"a connection failed: {exc!r}; retrying")
            await asyncio.sleep(0.2)
            return None

    def connected(clients):
        if len(clients) % 10 == 0:
            say(
                f"{len(clients)} clients connected, "
                f"workers used: {len({c.pid for c in clients})}"
            )

    await connect_spread(
        clients,
        open_one,
        args.clients,
        worker_pids,
        cap=args.clients * 3,
        timeout=args.connect_timeout,
        connected=connected,
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
            await client.send_json(
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
    requester = next((c for c in clients if c.close_reason is None), None)
    if requester is None:
        say("no connection left to ask for a job")
        return
    await requester.send_json({"type": "job", "job": job, "steps": args.job_steps})
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
    lost = [c for c in clients if c.close_reason is not None]
    if lost:
        print(
            f"connections lost before the end: {len(lost)} "
            f"({lost[0].close_reason!r})"
        )
        all_ok = False
    print(f"result: {'OK' if all_ok else 'FAILED'}")
    return all_ok


def describe_exit(code):
    if code is not None and code < 0:
        return f"ended by {signal.Signals(-code).name}"
    return f"exit code {code}"


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
    layer = backend()
    port = free_port()
    log_dir = tempfile.mkdtemp(prefix="dmb-chat-demo-")
    env = chat_env(prefix, CHAT_JOB_STEP_SECONDS="0.3")
    say(f"backend {layer}, prefix {prefix!r}, port {port}, logs in {log_dir}")

    services = []
    ok = False
    try:
        uvicorn = ServerProcess(
            "uvicorn", uvicorn_argv(port, args.workers), env, log_dir, note=say
        )
        services.append(uvicorn)
        worker = ServerProcess("runworker", runworker_argv(), env, log_dir, note=say)
        services.append(worker)
        say(f"started uvicorn (pid {uvicorn.pid}) and runworker (pid {worker.pid})")

        started = uvicorn.wait_for_lines(
            UVICORN_STARTED, args.workers, args.startup_timeout
        )
        if started is None:
            say("uvicorn workers did not all start in time")
            return 1
        worker_pids = {int(m.group(1)) for m in started}
        say(f"uvicorn workers up: {sorted(worker_pids)}")
        if wait_http_ok(port, "/healthz", args.startup_timeout) is None:
            say("the site did not answer HTTP in time")
            return 1
        if worker.wait_for_lines(RUNWORKER_READY, 1, args.startup_timeout) is None:
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
                tail = service.tail(15)
                if tail:
                    print(tail)
        if layer == DMB_BACKEND:
            say(f"removed shared-memory segment {remove_segment(prefix)}")


if __name__ == "__main__":
    sys.exit(main())
