"""The Django system checks of dmb's CHANNEL_LAYERS entries, and dmb.testing."""

import asyncio
import os

import django
import pytest
from django.conf import settings
from django.test import override_settings

if not settings.configured:
    settings.configure(INSTALLED_APPS=["dmb"], CHANNEL_LAYERS={})
    django.setup()

from dmb.checks import check_channel_layers  # noqa: E402
from dmb.errors import ConfigError  # noqa: E402
from dmb.segment import segment_name, segment_path  # noqa: E402
from dmb.testing import isolated_channel_layers  # noqa: E402

BACKEND = "dmb.SharedMemoryChannelLayer"


def ids(messages):
    return sorted(message.id for message in messages)


def layers(**aliases):
    return {alias: {"BACKEND": BACKEND, "CONFIG": c} for alias, c in aliases.items()}


def test_valid_config_passes_checks():
    with override_settings(CHANNEL_LAYERS=layers(default={"prefix": "site"})):
        assert check_channel_layers() == []


def test_redis_only_options_are_warned_about_not_refused():
    config = {"hosts": [("127.0.0.1", 6379)], "symmetric_encryption_keys": ["k"]}
    with override_settings(CHANNEL_LAYERS=layers(default=config)):
        messages = check_channel_layers()
    assert ids(messages) == ["dmb.W001", "dmb.W001"]
    assert "'hosts'" in messages[0].msg + messages[1].msg


def test_wrong_option_is_an_error_naming_it():
    with override_settings(CHANNEL_LAYERS=layers(default={"capacity": 0})):
        messages = check_channel_layers()
    assert ids(messages) == ["dmb.E001"]
    assert "'capacity'" in messages[0].msg


def test_unknown_option_is_an_error_naming_it():
    with override_settings(CHANNEL_LAYERS=layers(default={"capacitty": 5})):
        messages = check_channel_layers()
    assert ids(messages) == ["dmb.E001"]
    assert "capacitty" in messages[0].msg


@pytest.mark.parametrize(
    "test_config, wrong",
    [({"capcity": 5}, "capcity"), ({"size": 10}, "'size'"), ("small", "dict")],
)
def test_a_wrong_test_config_is_an_error_naming_test_config(test_config, wrong):
    entry = {
        "BACKEND": BACKEND,
        "CONFIG": {"prefix": "site"},
        "TEST_CONFIG": test_config,
    }
    with override_settings(CHANNEL_LAYERS={"default": entry}):
        messages = check_channel_layers()
        assert ids(messages) == ["dmb.E002"]
        assert "['TEST_CONFIG']" in messages[0].msg and wrong in messages[0].msg
        # A test run says the same, before it makes any segment.
        with pytest.raises(ConfigError, match=r"\['TEST_CONFIG'\]"):
            with isolated_channel_layers():
                pass


def test_a_valid_test_config_passes_checks():
    entry = {
        "BACKEND": BACKEND,
        "CONFIG": {"prefix": "site"},
        "TEST_CONFIG": {"prefix": "site-test", "size": 4 * 1024 * 1024},
    }
    with override_settings(CHANNEL_LAYERS={"default": entry}):
        assert check_channel_layers() == []


def test_two_aliases_sharing_a_prefix_are_warned_about():
    config = layers(default={"prefix": "x"}, other={"prefix": "x"})
    with override_settings(CHANNEL_LAYERS=config):
        assert ids(check_channel_layers()) == ["dmb.W002"]


def test_other_backends_are_not_checked():
    config = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    with override_settings(CHANNEL_LAYERS=config):
        assert check_channel_layers() == []


@pytest.mark.timeout(30)
def test_isolated_channel_layers_gives_a_fresh_segment_and_removes_it():
    from channels.layers import get_channel_layer

    config = layers(default={"prefix": "live-site", "size": 4 * 1024 * 1024})
    with override_settings(CHANNEL_LAYERS=config):
        with isolated_channel_layers() as prefixes:
            layer = get_channel_layer()
            assert layer.prefix == prefixes[0] != "live-site"
            asyncio.run(layer.send("q", {"type": "t"}))
            assert asyncio.run(layer.receive("q")) == {"type": "t"}
            path = segment_path(segment_name(prefixes[0]))
        assert not os.path.exists(path)
