"""Helpers for testing a site that uses dmb: one segment per test run.

Use from Django's test settings::

    from dmb.testing import test_prefix
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "dmb.SharedMemoryChannelLayer",
            "CONFIG": {"prefix": "mysite"},
            "TEST_CONFIG": {"prefix": test_prefix("mysite")},
        }
    }

or wrap tests in ``isolated_channel_layers()``, or, with pytest, use the
``dmb_channel_layers`` fixture that dmb registers as a pytest plugin.  Each
gives the tests a segment of their own and removes it afterwards, so runs
in parallel (or a run beside the live site) never meet.
"""

import contextlib
import os
import secrets

from .segment import segment_name, unlink_segment

BACKENDS = ("dmb.SharedMemoryChannelLayer", "dmb.layer.SharedMemoryChannelLayer")


def test_prefix(base="test"):
    """A prefix unique to this process and call, for a test segment."""
    return f"{base}-{os.getpid()}-{secrets.token_hex(3)}"


test_prefix.__test__ = False  # not a test, whatever pytest thinks of the name


@contextlib.contextmanager
def isolated_channel_layers(base="test"):
    """Point every dmb entry of CHANNEL_LAYERS at a fresh segment.

    Channels' cached layers are reset on entry and exit, and the segments
    are removed on exit.  Processes started inside the block (a live server
    forked by ChannelsLiveServerTestCase, say) see the same settings.
    """
    from channels.layers import channel_layers
    from django.conf import settings
    from django.test import override_settings

    layers = {}
    prefixes = []
    names = []
    for alias, entry in getattr(settings, "CHANNEL_LAYERS", {}).items():
        entry = dict(entry)
        if entry.get("BACKEND") in BACKENDS:
            prefix = test_prefix(base)
            prefixes.append(prefix)
            entry["CONFIG"] = {**entry.get("CONFIG", {}), "prefix": prefix}
            shared = bool(entry["CONFIG"].get("mode", 0o600) & 0o077)
            names.append(segment_name(prefix, shared=shared))
        layers[alias] = entry
    with override_settings(CHANNEL_LAYERS=layers):
        channel_layers.backends = {}
        try:
            yield prefixes
        finally:
            for layer in channel_layers.backends.values():
                close = getattr(layer, "close_sync", None)
                if close is not None:
                    close()
            channel_layers.backends = {}
            for name in names:
                unlink_segment(name)


def _pytest_fixture():
    import pytest

    @pytest.fixture
    def dmb_channel_layers():
        """Give the test its own dmb segments; yields their prefixes."""
        with isolated_channel_layers() as prefixes:
            yield prefixes

    return dmb_channel_layers


try:  # the pytest plugin (see the pytest11 entry point in setup.cfg)
    dmb_channel_layers = _pytest_fixture()
except ImportError:  # pytest is not installed: nothing to register
    pass
