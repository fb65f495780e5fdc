"""conftest.py for channels_redis's own test suite, run against dmb.

run_channels_redis_suite.py copies this file next to the extracted upstream
tests as their conftest.py. It is imported before any upstream test module,
so the names those modules import from channels_redis are already dmb:

- ``RedisChannelLayer(...)`` and ``RedisPubSubChannelLayer(...)`` build a
  ``dmb.SharedMemoryChannelLayer`` with the same keyword arguments, on a
  prefix of its own per test (every layer of one test shares it, as the
  processes of one site do). ``hosts`` and ``symmetric_encryption_keys``
  go through unchanged: dmb accepts and ignores them.
- Opening a Redis connection pool raises, so nothing here talks to Redis.
- Each test's segments are unlinked after it.
- Every test's outcome is written as JSON to $DMB_UPSTREAM_RESULTS.
"""

import asyncio
import json
import os
import sys
import types
import uuid

import pytest

import channels_redis.core
import channels_redis.pubsub
import channels_redis.utils
import dmb
import dmb.segment

SEGMENT_SIZE = 4194304

try:
    import async_timeout  # noqa: F401  (the upstream tests import it)
except ImportError:
    if not hasattr(asyncio, "timeout"):
        raise ImportError(
            "the channels_redis tests need async_timeout (pip install "
            "async-timeout) on Python before 3.11"
        ) from None
    # Python 3.11 has the same context manager built in.
    sys.modules["async_timeout"] = types.SimpleNamespace(timeout=asyncio.timeout)


class UpstreamDmbLayer(dmb.SharedMemoryChannelLayer):
    async def close_pools(self):
        """channels_redis releases its per-event-loop Redis connections here
        (the layer stays usable). dmb holds no such connections."""


_test_state = {"prefix": None, "layers": [], "segments": set()}


def build_dmb_layer(*args, prefix=None, **config):
    if args:
        raise TypeError("dmb takes keyword arguments only")
    base = _test_state["prefix"] or "up" + uuid.uuid4().hex[:10]
    prefix = base if prefix is None else f"{base}-{prefix}"
    _test_state["segments"].add(dmb.segment.segment_name(prefix))
    layer = UpstreamDmbLayer(prefix=prefix, size=SEGMENT_SIZE, **config)
    _test_state["layers"].append(layer)
    return layer


def _no_redis(*args, **kwargs):
    raise RuntimeError("this run of the channels_redis suite has no Redis")


channels_redis.core.RedisChannelLayer = build_dmb_layer
channels_redis.pubsub.RedisPubSubChannelLayer = build_dmb_layer
channels_redis.core.create_pool = _no_redis
channels_redis.pubsub.create_pool = _no_redis
channels_redis.utils.create_pool = _no_redis


@pytest.fixture(autouse=True)
def dmb_namespace():
    _test_state["prefix"] = "up" + uuid.uuid4().hex[:10]
    _test_state["layers"] = []
    _test_state["segments"] = set()
    yield
    layers, _test_state["layers"] = _test_state["layers"], []
    segments, _test_state["segments"] = _test_state["segments"], set()
    for layer in layers:
        segments.add(layer.segment_name)
        try:
            asyncio.run(asyncio.wait_for(layer.close(), 5))
        except Exception as error:  # the segment is unlinked all the same
            print(f"closing {layer.segment_name} failed: {error!r}")
    for name in segments:
        dmb.segment.unlink_segment(name)


# Outcome of every test, for the runner.

_outcomes = {}


def pytest_runtest_logreport(report):
    previous = _outcomes.get(report.nodeid)
    xfail = hasattr(report, "wasxfail")
    if report.failed:
        outcome = "failed" if report.when == "call" else "error"
        _outcomes[report.nodeid] = {
            "outcome": outcome,
            "detail": str(report.longrepr)[-3000:],
        }
    elif previous is not None and previous["outcome"] in ("failed", "error"):
        return
    elif report.when == "call" and report.passed:
        _outcomes[report.nodeid] = {"outcome": "xpassed" if xfail else "passed"}
    elif report.skipped:
        _outcomes[report.nodeid] = {
            "outcome": "xfailed" if xfail else "skipped",
            "detail": report.wasxfail if xfail else str(report.longrepr),
        }


def pytest_sessionfinish(session):
    path = os.environ.get("DMB_UPSTREAM_RESULTS")
    if path:
        with open(path, "w") as stream:
            json.dump(_outcomes, stream, indent=1, sort_keys=True)
