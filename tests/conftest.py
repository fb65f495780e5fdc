"""Fixtures shared by the whole suite.

Every test gets its own segment: ``prefix`` is unique per test, and
``make_layer`` builds layers on it and removes the segment afterwards.
"""

import itertools
import os
import secrets

import pytest

from dmb import SharedMemoryChannelLayer
from dmb.segment import segment_name, unlink_segment

#: Small segments keep set-up fast; tests that need more pass ``size``.
TEST_SIZE = 4 * 1024 * 1024

_counter = itertools.count()


def unique_prefix(tag="t"):
    """A prefix no other test (or test run) uses, short enough for any OS."""
    return f"{tag}{os.getpid() % 100000}{next(_counter)}{secrets.token_hex(2)}"


@pytest.fixture
def prefix():
    name = unique_prefix()
    yield name
    unlink_segment(segment_name(name))


@pytest.fixture
def make_layer(prefix):
    """Build layers on this test's segment; all are closed at teardown."""
    layers = []

    def make(**config):
        config.setdefault("prefix", prefix)
        config.setdefault("size", TEST_SIZE)
        layer = SharedMemoryChannelLayer(**config)
        layers.append(layer)
        return layer

    yield make
    for layer in layers:
        layer.close_sync()
    for name in {layer.segment_name for layer in layers}:
        unlink_segment(name)
