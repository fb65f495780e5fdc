"""Channel and group names: new_channel() and validation."""

import asyncio
import random
import re

import pytest

from ._support import needs, recv, xfail_backend

pytestmark = pytest.mark.asyncio

# The rule channels.layers.BaseChannelLayer applies to channel names.
VALID_CHANNEL_NAME = re.compile(r"^[a-zA-Z\d\-_.]+(\![\d\w\-_.]*)?$")

BAD_CHANNEL_NAMES = [
    "",
    "has space",
    "bad=char",
    "sl/ash",
    "caf\u00e9",
    "two!bangs!here",
    "!starts-with-bang",
    "x" * 100,
    "x" * 150,
    123,
    None,
    b"bytes-name",
    ["list"],
]

BAD_GROUP_NAMES = [
    "",
    "has space",
    "bad=char",
    "group!bang",
    "caf\u00e9",
    "g" * 100,
    42,
    None,
    b"bytes-group",
]


@pytest.mark.timeout(20)
async def test_new_channel_names_are_unique_and_specific(backend):
    layer = backend.make()
    names = [await layer.new_channel() for _ in range(200)]
    assert len(set(names)) == len(names)
    for name in names:
        assert isinstance(name, str) and len(name) < 100
        assert VALID_CHANNEL_NAME.match(name), name
    custom = await layer.new_channel(prefix="custom")
    if backend.lacks("specific_names"):
        # RedisPubSubChannelLayer: the layer prefix, then the given prefix.
        assert "!" not in custom and "custom" in custom
    else:
        for name in names:
            assert name.startswith("specific.") and name.count("!") == 1, name
            assert not name.endswith("!"), name
        assert custom.startswith("custom.") and custom.count("!") == 1
    # A fresh name is usable at once.
    await layer.send(custom, {"type": "test.fresh"})
    assert await recv(layer, custom) == {"type": "test.fresh"}


@pytest.mark.timeout(20)
@xfail_backend(
    "inmemory",
    "InMemoryChannelLayer draws new_channel() names from the random module, "
    "so reseeding it repeats them",
)
async def test_new_channel_names_stay_unique_when_random_is_reseeded(backend):
    layer = backend.make()
    state = random.getstate()
    try:
        random.seed(1)
        first = await layer.new_channel()
        random.seed(1)
        second = await layer.new_channel()
    finally:
        random.setstate(state)
    assert first != second


@pytest.mark.timeout(20)
@needs("validation")
@pytest.mark.parametrize(
    "operation", ["send", "receive", "group_add", "group_discard", "group_send"]
)
async def test_invalid_names_raise_type_error(backend, operation):
    """Every backend raises exactly TypeError, as BaseChannelLayer does."""
    layer = backend.make()
    message = {"type": "test.x"}
    if operation in ("send", "receive"):
        cases = BAD_CHANNEL_NAMES
    elif operation == "group_send":
        cases = BAD_GROUP_NAMES
    else:
        cases = [("conformance.ok", g) for g in BAD_GROUP_NAMES] + [
            (c, "good-group") for c in BAD_CHANNEL_NAMES
        ]
    wrong = []
    for case in cases:
        if operation == "send":
            call = layer.send(case, message)
        elif operation == "receive":
            call = layer.receive(case)
        elif operation == "group_send":
            call = layer.group_send(case, message)
        else:
            channel, group = case
            call = getattr(layer, operation)(group, channel)
        try:
            await asyncio.wait_for(call, 1)
        except TypeError:
            continue
        except asyncio.TimeoutError:
            wrong.append(f"{case!r}: accepted (waited for a message)")
        except Exception as error:
            wrong.append(f"{case!r}: {type(error).__name__}: {error}")
        else:
            wrong.append(f"{case!r}: accepted")
    assert not wrong, f"{operation} did not raise TypeError for: " + "; ".join(wrong)


@pytest.mark.timeout(20)
async def test_names_shorter_than_100_characters_are_accepted(backend):
    layer = backend.make()
    specific = await layer.new_channel()
    group = "g" * 99
    await layer.group_add(group, specific)
    await layer.group_send(group, {"type": "test.long"})
    assert await recv(layer, specific) == {"type": "test.long"}
    await layer.group_discard(group, specific)
    if not backend.lacks("stored_messages"):
        normal = "n" * 99
        await layer.send(normal, {"type": "test.long"})
        assert await recv(layer, normal) == {"type": "test.long"}
