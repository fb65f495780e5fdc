"""Every CONFIG option is validated when the layer is built, with an error
naming the option; a channels_redis CONFIG works with only BACKEND changed."""

import os
import re

import pytest
from channels.exceptions import InvalidChannelLayerError

from dmb import ConfigError
from dmb.segment import MIN_SIZE, segment_name, segment_path

pytestmark = pytest.mark.timeout(30)

NAN = float("nan")
INF = float("inf")

BAD_VALUES = {
    "expiry": ["60", 0, -1, -0.5, True, False, None, [60], NAN, INF, 10**30,
               1e-12, 0.0009],
    "group_expiry": ["86400", 0, -5, True, None, NAN, INF, 10**11, 1e-12],
    "capacity": ["100", 0, -1, 1.5, True, None, 2**32, 10**30],
    "size": ["big", 0, -1, 4.5 * 1024 * 1024, True, MIN_SIZE - 1],
    "max_message_size": ["1k", 0, -1, 10.5, True],
    "prefix": ["", "has space", "a/b", "slash/", "caf\u00e9", 5, None, b"asgi",
               "asgi\n", "long~tail"],
    "mode": ["600", 0o400, 0o200, 0o000, 0o644 & ~0o200, 0o1600, True, 6.0],
    "channel_capacity": [
        ["http.*", 10],
        "http.*",
        {"http.*": 0},
        {"http.*": -1},
        {"http.*": True},
        {"http.*": "10"},
        {3: 10},
        {"http.*": 2**32},
    ],
}

CASES = [(option, value) for option, value in BAD_VALUES.items() for value in value]


@pytest.mark.parametrize("option, value", CASES, ids=[f"{o}={v!r}" for o, v in CASES])
def test_wrong_option_is_a_config_error_naming_it(make_layer, prefix, option, value):
    with pytest.raises(ConfigError) as caught:
        make_layer(**{option: value})
    assert option in str(caught.value)
    assert not os.path.exists(segment_path(segment_name(prefix))), (
        "a refused CONFIG still made a segment"
    )


def test_config_error_is_the_channels_invalid_layer_error(make_layer):
    with pytest.raises(InvalidChannelLayerError):
        make_layer(capacity=0)


def test_size_below_min_size_names_the_minimum(make_layer):
    with pytest.raises(ConfigError) as caught:
        make_layer(size=MIN_SIZE - 1)
    assert "'size'" in str(caught.value)
    assert str(MIN_SIZE) in str(caught.value)


def test_size_at_min_size_is_accepted(make_layer):
    layer = make_layer(size=MIN_SIZE)
    assert layer.size == MIN_SIZE


def test_mode_must_include_owner_read_and_write(make_layer):
    with pytest.raises(ConfigError) as caught:
        make_layer(mode=0o440)
    assert "'mode'" in str(caught.value)
    assert "0o600" in str(caught.value)
    assert make_layer(mode=0o640).mode == 0o640


def test_max_message_size_larger_than_half_the_store_is_refused(make_layer):
    with pytest.raises(ConfigError) as caught:
        make_layer(size=MIN_SIZE, max_message_size=MIN_SIZE)
    assert "'max_message_size'" in str(caught.value)


def test_defaults_are_those_of_channels_redis(make_layer):
    layer = make_layer()
    assert layer.expiry == 60
    assert layer.group_expiry == 86400
    assert layer.capacity == 100
    assert layer.channel_capacity == []


def test_largest_accepted_values_work_at_send_time(make_layer):
    """What validation lets through must not fail later, in the C core."""
    layer = make_layer(
        expiry=10 * 365 * 86400,
        group_expiry=10 * 365 * 86400,
        capacity=2**32 - 1,
        channel_capacity={"big.*": 2**32 - 1},
    )
    layer.send_sync("big.one", {"type": "ok"})
    layer.group_add_sync("big-group", "big.one")
    layer.group_send_sync("big-group", {"type": "ok"})
    layer.flush_sync()


def test_numbers_of_other_real_types_are_accepted(make_layer):
    layer = make_layer(expiry=0.5, group_expiry=2.5)
    assert layer.expiry == 0.5
    assert layer.group_expiry == 2.5


def test_channels_redis_config_is_accepted_as_is(make_layer, prefix):
    config = {
        "hosts": [("127.0.0.1", 6379), "redis://127.0.0.1:6380/0"],
        "symmetric_encryption_keys": ["a-secret-key"],
        "expiry": 30,
        "group_expiry": 3600,
        "capacity": 50,
        "channel_capacity": {"http.request": 200, re.compile(r"^websocket\."): 20},
        "prefix": prefix,
    }
    layer = make_layer(**config)
    assert layer.expiry == 30
    assert layer.group_expiry == 3600
    assert layer.capacity == 50
    assert layer.get_capacity("http.request") == 200
    assert layer.get_capacity("websocket.send") == 20
    assert layer.get_capacity("other") == 50
    assert set(layer.ignored_options) == {"hosts", "symmetric_encryption_keys"}
    layer.send_sync("after.redis.config", {"type": "ok"})


@pytest.mark.parametrize("key", ["hostz", "capacityy", "serializer", "size_mb"])
def test_unknown_option_is_an_error_naming_it(make_layer, key):
    with pytest.raises(ConfigError) as caught:
        make_layer(**{key: 1})
    assert repr(key) in str(caught.value)


def test_all_unknown_options_are_named_at_once(make_layer):
    with pytest.raises(ConfigError) as caught:
        make_layer(hosts=[], colour="blue", flavour="mint")
    text = str(caught.value)
    assert "'colour'" in text and "'flavour'" in text
    listed = text.split(" for ")[0]  # the unknown ones, before the help
    assert "'hosts'" not in listed
