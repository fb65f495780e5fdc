"""Worker processes, the layers under test, and the benchmark's redis-server.

Every cross-process scenario runs its roles in fresh worker processes
(multiprocessing "spawn": no state inherited from the harness).  A worker
builds one layer from a spec, then runs the functions the harness sends it,
one at a time, on one event loop kept for the worker's life.  A function
may talk to the harness while it runs (``ctx.signal``), which is how
receivers say they are ready before a sender starts.

Times that cross processes are ``time.monotonic_ns()``: CLOCK_MONOTONIC is
one clock for every process of a Linux host.
"""

import asyncio
import contextlib
import inspect
import multiprocessing
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback

SPAWN = multiprocessing.get_context("spawn")

#: What each layer kind is called in tables and plots.
LABELS = {
    "dmb": "dmb",
    "redis": "channels_redis core",
    "pubsub": "channels_redis pubsub",
    "inmemory": "InMemoryChannelLayer",
    "pipe": "bare pipe (asyncio)",
}

#: dmb's segment for the benchmarks: big enough for 100,000 channels.
DMB_SIZE = 256 * 1024 * 1024


# The layers under test.


class Backends:
    """Makes layer specs: plain dicts a worker turns into a layer."""

    def __init__(self, redis_port=None, tag="b"):
        self.redis_port = redis_port
        self.tag = tag
        self._count = 0
        self.prefixes = []

    def new_prefix(self):
        """A dmb prefix used by nothing else (one segment per scenario)."""
        self._count += 1
        prefix = f"{self.tag}{os.getpid()}x{self._count}"
        self.prefixes.append(prefix)
        return prefix

    def spec(self, kind, prefix=None, **config):
        if kind == "dmb":
            config.setdefault("size", DMB_SIZE)
            config["prefix"] = prefix or self.new_prefix()
        elif kind in ("redis", "pubsub"):
            if self.redis_port is None:
                raise RuntimeError("no redis-server for the channels_redis layers")
            config["hosts"] = [("127.0.0.1", self.redis_port)]
            if kind == "pubsub":
                config.pop("capacity", None)  # pubsub has no capacity
            config.setdefault("prefix", f"{self.tag}{os.getpid()}")
        elif kind == "inmemory":
            pass
        elif kind != "pipe":
            raise ValueError(f"unknown layer kind {kind!r}")
        return {"kind": kind, "config": config}

    def cleanup(self):
        from dmb.segment import segment_name, unlink_segment

        for prefix in self.prefixes:
            unlink_segment(segment_name(prefix))
        self.prefixes.clear()


def make_layer(spec):
    kind, config = spec["kind"], dict(spec["config"])
    if kind == "dmb":
        from dmb import SharedMemoryChannelLayer

        return SharedMemoryChannelLayer(**config)
    if kind == "redis":
        from channels_redis.core import RedisChannelLayer

        return RedisChannelLayer(**config)
    if kind == "pubsub":
        from channels_redis.pubsub import RedisPubSubChannelLayer

        return RedisPubSubChannelLayer(**config)
    if kind == "inmemory":
        from channels.layers import InMemoryChannelLayer

        return InMemoryChannelLayer(**config)
    return None


def cpu_seconds():
    """User plus system CPU of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid):
    """User plus system CPU of another process, from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def message(seq, payload):
    """The message every scenario sends: a sequence number and a payload."""
    return {"type": "bench.message", "seq": seq, "payload": payload}


def payload_of(size):
    return bytes(size)


# Worker processes.


class WorkerError(RuntimeError):
    pass


class Context:
    """What a worker function gets: its layer, a state dict, the harness."""

    def __init__(self, layer, conn, extra, name):
        self.layer = layer
        self.conn = conn
        self.extra = extra
        self.name = name
        self.state = {}

    def signal(self, tag, payload=None):
        self.conn.send((tag, payload))

    def wait(self, tag):
        got, payload = self.conn.recv()
        if got != tag:
            raise RuntimeError(f"worker {self.name} expected {tag!r}, got {got!r}")
        return payload


def _worker_main(conn, spec, name, extra):
    if os.environ.get("BENCH_DUMP_AFTER"):
        import faulthandler

        faulthandler.dump_traceback_later(
            float(os.environ["BENCH_DUMP_AFTER"]), repeat=False
        )
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        layer = make_layer(spec)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    ctx = Context(layer, conn, extra, name)
    conn.send(("started", os.getpid()))
    while True:
        try:
            command = conn.recv()
        except EOFError:
            break
        if command[0] == "stop":
            break
        _, function, kwargs = command
        try:
            if inspect.iscoroutinefunction(function):
                result = loop.run_until_complete(function(ctx, **kwargs))
            else:
                result = function(ctx, **kwargs)
            conn.send(("result", result))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    if spec["kind"] == "dmb":
        layer.close_sync()
    elif spec["kind"] == "redis":
        with contextlib.suppress(Exception):
            loop.run_until_complete(layer.close_pools())
    conn.send(("stopped", None))


class Worker:
    """One worker process and the harness's end of its pipe."""

    def __init__(self, spec, name, extra=None):
        self.name = name
        self.spec = spec
        self.conn, child = SPAWN.Pipe()
        self.process = SPAWN.Process(
            target=_worker_main, args=(child, spec, name, extra), daemon=True
        )
        self.process.start()
        child.close()
        self.pid = None

    def started(self, timeout=120):
        self.pid = self.expect("started", timeout)
        return self

    def start(self, function, **kwargs):
        """Run function(ctx, **kwargs) in the worker; don't wait."""
        self.conn.send(("call", function, kwargs))

    def expect(self, tag, timeout=600):
        if not self.conn.poll(timeout):
            raise WorkerError(f"worker {self.name}: nothing within {timeout} s")
        try:
            got, payload = self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise WorkerError(
                f"worker {self.name} died (exit code {self.process.exitcode})"
            ) from None
        if got == "error":
            raise WorkerError(f"worker {self.name} failed:\n{payload}")
        if got != tag:
            raise WorkerError(f"worker {self.name}: expected {tag!r}, got {got!r}")
        return payload

    def send(self, tag, payload=None):
        self.conn.send((tag, payload))

    def call(self, function, _timeout=600, **kwargs):
        self.start(function, **kwargs)
        return self.expect("result", _timeout)

    def stop(self):
        if self.process.is_alive():
            with contextlib.suppress(Exception):
                self.conn.send(("stop",))
                if self.conn.poll(5):
                    self.conn.recv()
            self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.conn.close()


@contextlib.contextmanager
def workers(specs_and_names, extras=None):
    """Start several workers at once (they import in parallel)."""
    extras = extras or [None] * len(specs_and_names)
    started = []
    try:
        for (spec, name), extra in zip(specs_and_names, extras):
            started.append(Worker(spec, name, extra))
        for worker in started:
            worker.started()
        yield started
    finally:
        for worker in started:
            worker.stop()


def expect_all(group, tag, timeout=600):
    return [worker.expect(tag, timeout) for worker in group]


# The redis-server the channels_redis layers talk to.


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server on 127.0.0.1, no persistence, gone at exit."""

    def __init__(self, executable=None):
        self.executable = executable or shutil.which("redis-server")
        if not self.executable:
            raise RuntimeError("redis-server not found (apt-get install redis)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="dmb-bench-redis-")
        self.process = subprocess.Popen(
            [
                self.executable,
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--save", "",
                "--appendonly", "no",
                "--dir", self.dir,
                "--daemonize", "no",
                "--maxclients", "10000",
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._wait_ready()
        self.version = self._command("INFO", "server").split("redis_version:")[1]
        self.version = self.version.split()[0]

    def _wait_ready(self, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace")
                raise RuntimeError(f"redis-server exited: {err.strip()}")
            try:
                if self._command("PING") == "PONG":
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def _command(self, *args):
        """One RESP command over a fresh connection (no client library)."""
        out = b"*%d\r\n" % len(args)
        for arg in args:
            arg = arg.encode()
            out += b"$%d\r\n%s\r\n" % (len(arg), arg)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(out)
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            if data.startswith(b"$"):
                length = int(data[1 : data.index(b"\r\n")])
                head = data.index(b"\r\n") + 2
                while len(data) < head + length:
                    data += s.recv(65536)
                return data[head : head + length].decode()
            return data[1 : data.index(b"\r\n")].decode()

    def flush(self):
        self._command("FLUSHALL")

    def cpu_seconds(self):
        return process_cpu_seconds(self.process.pid)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def python_info():
    return f"{sys.version.split()[0]} ({sys.executable})"


# Run settings shared by every scenario.


class Env:
    """The run's settings: how long, how often, which layers, where to log."""

    def __init__(self, mode="full", repeats=3, kinds=None, backends=None,
                 redis=None, idle_seconds=None, log=print):
        self.mode = mode  # "full", "quick" or "smoke"
        self.repeats = repeats
        self.kinds = kinds or ["dmb", "redis", "pubsub", "inmemory"]
        self.backends = backends
        self.redis = redis
        self.idle_seconds = idle_seconds
        self.log = log

    def pick(self, full, quick, smoke=None):
        if self.mode == "full":
            return full
        if self.mode == "smoke" and smoke is not None:
            return smoke
        return quick

    @property
    def target_seconds(self):
        """How long one timed repeat should last."""
        return self.pick(1.0, 0.3, 0.05)

    def wants(self, kind):
        if kind in ("redis", "pubsub") and self.redis is None:
            return False
        return kind in self.kinds

    def flush_redis(self):
        if self.redis is not None:
            self.redis.flush()


def calibrate(measure, base, target, cap):
    """Pick a count that makes one repeat last about ``target`` seconds.

    ``measure(count)`` runs one round and returns its result dict, whose
    "elapsed" is in seconds.  The round run here is a warm-up; its result
    is returned too, so its loss checks still count.
    """
    warm = measure(base)
    elapsed = warm["elapsed"]
    if elapsed <= 0:
        return cap, warm
    count = int(base * target / elapsed)
    return max(base, min(cap, count)), warm
