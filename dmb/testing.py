"""Helpers for testing a site that uses dmb: one segment per test run.

In the settings, say what a test run's layer should be with TEST_CONFIG,
and name dmb's test runner::

    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "dmb.SharedMemoryChannelLayer",
            "CONFIG": {"prefix": "mysite"},
            "TEST_CONFIG": {"prefix": "mysite-test", "size": 8 * 1024 * 1024},
        }
    }
    TEST_RUNNER = "dmb.testing.DiscoverRunner"

``manage.py test`` then runs on a segment of its own, named from the
TEST_CONFIG prefix, this process's pid and a random tag, and removes it at
the end.  Without the runner, wrap tests in ``isolated_channel_layers()``;
with pytest, use the ``dmb_channel_layers`` fixture that dmb registers as a
pytest plugin.  Each gives the tests a segment of their own, so runs in
parallel (or a run beside the live site) never meet.
"""

import contextlib
import os
import secrets

from .errors import ConfigError
from .layer import BACKENDS, validate_config
from .segment import segment_name, unlink_segment


def test_prefix(base="test"):
    """A prefix unique to this process and call, for a test segment."""
    return f"{base}-{os.getpid()}-{secrets.token_hex(3)}"


test_prefix.__test__ = False  # not a test, whatever pytest thinks of the name


def test_config(alias, entry):
    """An entry's CONFIG with its TEST_CONFIG laid over it, checked.

    A mistake in CONFIG raises ConfigError as CONFIG's; one that TEST_CONFIG
    brings raises it naming TEST_CONFIG.
    """
    overrides = entry.get("TEST_CONFIG", {})
    where = f"CHANNEL_LAYERS[{alias!r}]['TEST_CONFIG']"
    if not isinstance(overrides, dict):
        raise ConfigError(
            f"{where} must be a dict of options, not {type(overrides).__name__}"
        )
    config = entry.get("CONFIG", {})
    validate_config(config)
    merged = {**config, **overrides}
    try:
        validate_config(merged)
    except ConfigError as exc:
        raise ConfigError(f"{where}, laid over CONFIG for test runs: {exc}") from None
    return merged


test_config.__test__ = False  # not a test, whatever pytest thinks of the name


@contextlib.contextmanager
def isolated_channel_layers(base="test"):
    """Point every dmb entry of CHANNEL_LAYERS at a fresh segment.

    An entry's TEST_CONFIG, if it has one, is laid over its CONFIG, and its
    ``prefix`` (else ``base``) starts the fresh segment's prefix.  Channels'
    cached layers are reset on entry and exit, and the segments are removed
    on exit.  Processes forked inside the block (the live server of
    ChannelsLiveServerTestCase, say) see the same settings.
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
            config = test_config(alias, entry)
            prefix = test_prefix(entry.get("TEST_CONFIG", {}).get("prefix", base))
            prefixes.append(prefix)
            entry["CONFIG"] = {**config, "prefix": prefix}
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


def _discover_runner():
    from django.test.runner import DiscoverRunner as Base

    class DiscoverRunner(Base):
        """Django's test runner, with a segment of the run's own.

        ``TEST_RUNNER = "dmb.testing.DiscoverRunner"`` runs the whole of
        ``manage.py test`` inside ``isolated_channel_layers()``.  Another
        runner can do the same in its ``setup_test_environment``.
        """

        def setup_test_environment(self, **kwargs):
            super().setup_test_environment(**kwargs)
            self._dmb_layers = isolated_channel_layers()
            self.dmb_prefixes = self._dmb_layers.__enter__()

        def teardown_test_environment(self, **kwargs):
            try:
                self._dmb_layers.__exit__(None, None, None)
            finally:
                super().teardown_test_environment(**kwargs)

    DiscoverRunner.__module__ = __name__
    DiscoverRunner.__qualname__ = "DiscoverRunner"
    return DiscoverRunner


def __getattr__(name):
    # Django's runner is imported only when asked for, so that this module
    # (a pytest plugin) stays light for projects that do not use it.
    if name == "DiscoverRunner":
        globals()[name] = _discover_runner()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
