"""Fixtures of the end-to-end tests: a unique channel layer prefix per test,
and the servers a test starts, stopped (and the segment removed) after it."""

import uuid

import pytest

from . import helpers


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "e2e: end-to-end test with real servers and websocket clients"
    )


@pytest.fixture
def e2e_prefix():
    """A channel layer prefix no other test (or site) uses.

    The segment it names is removed after the test, once every server the
    test started has stopped (the `servers` fixture depends on this one, so
    it is torn down first).
    """
    prefix = f"e2e{uuid.uuid4().hex[:10]}"
    yield prefix
    helpers.unlink_segment(prefix)


@pytest.fixture
def servers(e2e_prefix, tmp_path):
    """Start servers with servers.start(name, argv, **env); all stop at the end."""
    started = []

    class Servers:
        def start(self, name, argv, **extra_env):
            env = helpers.chat_env(e2e_prefix, **extra_env)
            server = helpers.ServerProcess(name, argv, env, tmp_path)
            started.append(server)
            return server

    yield Servers()
    for server in reversed(started):
        code = server.stop()
        # Shown only when the test fails (pytest captures it otherwise).
        print(f"--- {server.name} (pid {server.pid}, exit {code}) ---")
        print(server.tail(60))
