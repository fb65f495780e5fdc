"""The chat example under gunicorn with uvicorn workers and --preload.

With --preload the arbiter imports the application once and forks the
workers from it, so every worker starts with a copy of the arbiter's
memory: whatever channel layer state exists at fork time is shared by all.
"""

import asyncio
import re
from pathlib import Path

import pytest

from . import helpers

pytestmark = pytest.mark.e2e

ROOM = "preloaded"
USE_LAYER_BEFORE_FORK = Path(__file__).with_name("gunicorn_preload_conf.py")
PRELOAD_OK = re.compile(r"preload: layer round trip in arbiter pid (\d+) ok")
WORKERS = 3


def start_gunicorn(servers, config_file=None):
    port = helpers.free_port()
    argv = helpers.gunicorn_argv(port, WORKERS, config_file)
    server = servers.start("gunicorn", argv)
    if config_file is not None:
        (preload,) = server.wait_for_lines(PRELOAD_OK, 1, timeout=60)
        assert int(preload.group(1)) == server.pid
    started = server.wait_for_lines(helpers.UVICORN_STARTED, WORKERS, timeout=60)
    pids = {int(m.group(1)) for m in started}
    assert server.pid not in pids
    helpers.wait_http_ok(port, timeout=30)
    return server, port, pids


async def room_traffic(port, pids):
    clients = await helpers.connect_spread(port, ROOM, 9, pids, cap=45)
    try:
        assert {c.pid for c in clients} == pids, helpers.spread(clients)
        missing = await helpers.chat_round(clients, clients, "g1", 3, 30)
        assert not missing, f"undelivered: {missing}"

        status, body = await asyncio.to_thread(
            helpers.http_request,
            port,
            "POST",
            f"/rooms/{ROOM}/announce",
            {"text": "forked and fine"},
        )
        assert status == 202, body
        late = await helpers.wait_all(
            clients,
            lambda c: any(
                f["text"] == "forked and fine" for f in c.of_type("announce")
            ),
            20,
        )
        assert not late, f"no announcement for {[c.name for c in late]}"
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


@pytest.mark.timeout(90)
def test_gunicorn_preload(servers):
    """Preloaded workers, layer first used in each worker, share a room."""
    _, port, pids = start_gunicorn(servers)
    asyncio.run(asyncio.wait_for(room_traffic(port, pids), 60))


@pytest.mark.timeout(90)
def test_gunicorn_preload_layer_used_before_fork(request, servers):
    """Workers forked from an arbiter that already used the layer still work.

    channels_redis fails this one: its layer picks one random client prefix
    when it is built, so all forked workers share it and take each other's
    messages off Redis. dmb notices the fork and attaches anew.
    """
    if helpers.backend() != helpers.DMB_BACKEND:
        request.applymarker(
            pytest.mark.xfail(reason="forked workers share the arbiter's layer state")
        )
    _, port, pids = start_gunicorn(servers, USE_LAYER_BEFORE_FORK)
    asyncio.run(asyncio.wait_for(room_traffic(port, pids), 60))
