"""BR-07: payload fidelity, undecodable messages, 1 MB messages."""

import datetime
import os

import pytest

import dmb

from .support import TEST_SIZE, br07_reader

pytestmark = pytest.mark.asyncio

# Room for both 1 MB messages queued at once, and a maximum well under 20 MB.
CONFIG = {"size": 2 * TEST_SIZE}
GROUP = "holders"

M1 = {
    "type": "t",
    "text": "déjà vu, 東京, 🎉",
    "bytes": bytes(range(256)),
    "max": 2**63 - 1,
    "min": -(2**63),
    "float": 1.0e308,
    "none": None,
    "true": True,
    "nested": [1, [2, "x"], {"k": "v"}],
    "tuple": (1, 2),
    "empty_str": "",
    "empty_bytes": b"",
}
M4 = {"type": "after", "via": "send"}
M4_GROUP = {"type": "after", "via": "group_send"}

UNPACKABLE = (TypeError, ValueError, OverflowError, dmb.DmbError)


def bad_messages(max_size):
    return {
        "int key": {"type": "t", "k": {144: "a"}},
        "None key": {"type": "t", None: "x"},
        "datetime": {"type": "t", "d": datetime.datetime(2024, 1, 2, 3, 4, 5)},
        "2**64": {"type": "t", "big": 2**64},
        "lone surrogate": {"type": "t", "s": "\ud800"},
        "oversize": {"type": "t", "blob": b"\0" * (max_size + 1)},
    }


@pytest.mark.timeout(60)
async def test_br07_payload_fidelity_and_refusals(make_layer, prefix, children):
    layer = make_layer(**CONFIG)  # process A
    assert layer.max_message_size < 20 * 1024 * 1024
    reader = children.start(br07_reader, prefix, CONFIG, GROUP, name="B")
    channel = await reader.expect("channel")

    m2 = {"type": "big", "blob": os.urandom(1_000_000)}
    m3 = {"type": "text", "text": "é" * 500_000}
    assert len(m3["text"].encode()) == 1_000_000
    for message in (M1, m2, m3):
        await layer.send(channel, message)

    for label, message in bad_messages(layer.max_message_size).items():
        for how in ("send", "group_send"):
            with pytest.raises(UNPACKABLE) as caught:
                if how == "send":
                    await layer.send(channel, message)
                else:
                    await layer.group_send(GROUP, message)
            error = caught.value
            if label == "int key":
                # dmb refuses it rather than deliver it; the error names it.
                assert isinstance(error, TypeError), (how, error)
                assert "144" in str(error), (how, error)
            if label == "None key":
                assert "None" in str(error), (how, error)
            if label == "oversize":
                assert isinstance(error, dmb.MessageTooLarge), (how, error)

    await layer.send(channel, M4)
    await layer.group_send(GROUP, M4_GROUP)
    got = await reader.expect("result", timeout=60)
    await children.join([reader], timeout=10)

    assert [m.get("type") for m in got] == ["t", "big", "text", "after", "after"]
    first, second, third, fourth, fifth = got
    expected = dict(M1, tuple=[1, 2])
    assert first == expected
    for key, value in expected.items():
        assert type(first[key]) is type(value), key
    assert first["max"] == 2**63 - 1 and first["min"] == -(2**63)
    assert second == m2 and type(second["blob"]) is bytes
    assert third == m3
    assert fourth == M4
    assert fifth == M4_GROUP
