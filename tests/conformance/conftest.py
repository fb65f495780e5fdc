"""The `backend` fixture: every conformance test runs once per channel layer.

Legs:

- ``dmb``: dmb.SharedMemoryChannelLayer on a prefix of its own per test,
  in a 4 MiB segment that is unlinked when the test ends.
- ``redis``: channels_redis.core.RedisChannelLayer against a redis-server
  started here on 127.0.0.1 (one per session), a prefix of its own per test.
- ``redis_pubsub``: channels_redis.pubsub.RedisPubSubChannelLayer, same server.
- ``inmemory``: channels.layers.InMemoryChannelLayer.

A test states what it needs with ``@needs("feature", ...)`` (or, for one
branch of a test, ``backend.require("feature")``); a backend listed in
``LIMITATIONS`` for that feature is skipped with the reason given there.
``@xfail_backend("name", reason=...)`` records a known failure of one
backend as an expected failure (strict unless it depends on timing).
"""

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import pytest_asyncio

from ._support import LIMITATIONS

BACKENDS = ("dmb", "redis", "redis_pubsub", "inmemory")

BACKEND_PATHS = {
    "dmb": "dmb.SharedMemoryChannelLayer",
    "redis": "channels_redis.core.RedisChannelLayer",
    "redis_pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
    "inmemory": "channels.layers.InMemoryChannelLayer",
}

DMB_SEGMENT_SIZE = 4194304

PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer.py")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "needs(*features): skip backends that lack a feature (see LIMITATIONS)",
    )
    config.addinivalue_line(
        "markers",
        "xfail_backend(name, reason, raises=None, strict=True): expected "
        "failure for one backend only",
    )


# -- redis-server, started once per session when a redis leg first needs it


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _redis_server_path():
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )


class RedisServer:
    def __init__(self, executable):
        self.executable = executable
        self.process = None
        self.port = None
        self.workdir = tempfile.mkdtemp(prefix="dmb-conformance-redis-")

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def start(self):
        import redis

        last_error = None
        for _ in range(3):
            self.port = _free_port()
            log = open(os.path.join(self.workdir, "redis.log"), "wb")
            self.process = subprocess.Popen(
                [
                    self.executable,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--protected-mode",
                    "yes",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self.workdir,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            client = redis.Redis(host="127.0.0.1", port=self.port)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    if client.ping():
                        client.close()
                        return
                except redis.exceptions.ConnectionError as error:
                    last_error = error
                    time.sleep(0.05)
            client.close()
            self.stop()
        raise RuntimeError(f"redis-server did not start: {last_error}")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server():
    executable = _redis_server_path()
    if executable is None:
        pytest.skip("redis-server is not installed; the redis legs need it")
    server = RedisServer(executable)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


# -- the backends


def _import_dmb():
    try:
        import dmb
        import dmb.segment
        from dmb import SharedMemoryChannelLayer  # noqa: F401
    except (ImportError, AttributeError) as error:
        pytest.skip(f"dmb is not importable yet: {error}")
    return dmb


class Peer:
    """A layer in another process (see peer.py)."""

    def __init__(self, process):
        self.process = process

    async def read(self, timeout=10):
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            await self.process.wait()
            error = await self.process.stderr.read()
            raise AssertionError(
                f"peer exited ({self.process.returncode}) without a result:\n"
                + error.decode(errors="replace")
            )
        return json.loads(line)

    async def write_line(self, text=""):
        self.process.stdin.write(text.encode() + b"\n")
        await self.process.stdin.drain()

    async def finish(self, timeout=10):
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        returncode = await asyncio.wait_for(self.process.wait(), timeout)
        if returncode != 0:
            error = await self.process.stderr.read()
            raise AssertionError(
                f"peer failed ({returncode}):\n" + error.decode(errors="replace")
            )

    def kill(self):
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()


class Backend:
    """Builds layers of one backend; every layer of one test shares one
    namespace (prefix), as the processes of one site do."""

    def __init__(self, name, request):
        self.name = name
        self.request = request
        self.namespace = "cf" + uuid.uuid4().hex[:10]
        self.layers = []
        self.peers = []
        self.server = None
        if name == "dmb":
            self.dmb = _import_dmb()
        elif name in ("redis", "redis_pubsub"):
            self.server = request.getfixturevalue("redis_server")

    def __repr__(self):
        return f"<Backend {self.name}>"

    # Features

    def lacks(self, feature):
        return LIMITATIONS[self.name].get(feature)

    def require(self, *features):
        for feature in features:
            reason = self.lacks(feature)
            if reason:
                pytest.skip(reason)

    @property
    def hosts(self):
        """A `hosts` value as a channels_redis CONFIG would carry it."""
        if self.server is not None:
            return [self.server.url]
        return ["redis://127.0.0.1:6379"]

    # Layers

    def config(self, **config):
        """The full configuration `make` would build with."""
        if self.name == "dmb":
            return {"prefix": self.namespace, "size": DMB_SEGMENT_SIZE, **config}
        if self.name in ("redis", "redis_pubsub"):
            return {"prefix": self.namespace, "hosts": self.hosts, **config}
        return dict(config)

    @property
    def path(self):
        """The BACKEND string of a CHANNEL_LAYERS entry."""
        return BACKEND_PATHS[self.name]

    def adopt(self, layer):
        """Close (and for dmb unlink) a layer built elsewhere at teardown."""
        self.layers.append(layer)
        return layer

    def make(self, **config):
        config = self.config(**config)
        if self.name == "dmb":
            layer = self.dmb.SharedMemoryChannelLayer(**config)
        elif self.name == "redis":
            from channels_redis.core import RedisChannelLayer

            layer = RedisChannelLayer(**config)
        elif self.name == "redis_pubsub":
            from channels_redis.pubsub import RedisPubSubChannelLayer

            layer = RedisPubSubChannelLayer(**config)
        else:
            from channels.layers import InMemoryChannelLayer

            layer = InMemoryChannelLayer(**config)
        self.layers.append(layer)
        return layer

    async def start_peer(self, action, config=None, **arguments):
        """Start peer.py with a layer built from the same configuration."""
        self.require("processes")
        spec = {
            "backend": self.name,
            "config": self.config(**(config or {})),
            "action": action,
            **arguments,
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            PEER_SCRIPT,
            json.dumps(spec),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        peer = Peer(process)
        self.peers.append(peer)
        return peer

    async def cleanup(self):
        for peer in self.peers:
            peer.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(peer.process.wait(), 5)
        errors = []
        segments = set()
        if self.name == "dmb":
            # Also the segment of a layer whose construction failed midway.
            segments.add(self.dmb.segment.segment_name(self.namespace))
        for layer in self.layers:
            try:
                if self.name == "dmb":
                    segments.add(layer.segment_name)
                    await asyncio.wait_for(layer.close(), 5)
                else:
                    await asyncio.wait_for(layer.flush(), 5)
            except Exception as error:  # teardown goes on; reported below
                errors.append(f"{type(error).__name__}: {error}")
        for name in segments:
            self.dmb.segment.unlink_segment(name)
        if errors:
            raise AssertionError("closing the layers failed: " + "; ".join(errors))


def _apply_markers(request, backend):
    for marker in request.node.iter_markers("needs"):
        backend.require(*marker.args)
    for marker in request.node.iter_markers("xfail_backend"):
        if marker.args[0] == backend.name:
            request.node.add_marker(
                pytest.mark.xfail(
                    strict=marker.kwargs.get("strict", True),
                    reason=marker.kwargs["reason"],
                    raises=marker.kwargs.get("raises"),
                )
            )


@pytest_asyncio.fixture(params=BACKENDS)
async def backend(request):
    name = request.param
    # Skip before anything is started for a leg the test cannot run.
    for marker in request.node.iter_markers("needs"):
        for feature in marker.args:
            reason = LIMITATIONS[name].get(feature)
            if reason:
                pytest.skip(reason)
    leg = Backend(name, request)
    _apply_markers(request, leg)
    try:
        yield leg
    finally:
        await leg.cleanup()
