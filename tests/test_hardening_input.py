"""Hostile and bad input, and a model-based test of the whole contract.

Bad names, non-dict messages, values msgpack cannot carry and oversize
messages reach every method: each is refused with the exception Channels'
own validation raises (or dmb's documented one), nothing is stored, and
the layer keeps working.  Then a hypothesis state machine drives two
layers on one segment against a model of the contract: FIFO per channel,
capacity per channel (with a pattern), groups, specific channels that die
with their layer, flush, and every message delivered at most once, in
order, or refused at send.
"""

import asyncio
import collections
import datetime
import itertools
import os

import pytest
from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dmb import ForeignChannel, MessageTooLarge, SharedMemoryChannelLayer
from dmb.segment import segment_name, unlink_segment

from conftest import unique_prefix
from hardening_support import handle_of, identity_holds, stats

pytestmark = pytest.mark.timeout(120)

#: Channels' own validation, the oracle for names.
ORACLE = BaseChannelLayer()

BAD_NAMES = [
    "",
    "a b",
    "tab\tx",
    "é",
    "x" * 100,
    "a!b!c",
    "!",
    "!abc",
    "a/b",
    "a:b",
    "nul\x00",
    "two\n\n",
    None,
    123,
    1.5,
    b"bytes",
    ["a"],
    object(),
]
GOOD_ODD_NAMES = ["x" * 99, "a..b", "-_.", "abc!", "end\n", "abc!_-.é"]


def oracle(check, name):
    try:
        check(name)
    except Exception as exc:
        return type(exc)
    return None


def calls_with_channel(layer, name):
    return {
        "send": lambda: layer.send(name, {"type": "x"}),
        "receive": lambda: asyncio.wait_for(layer.receive(name), 0.05),
        "group_add": lambda: layer.group_add("hostile.group", name),
        "group_discard": lambda: layer.group_discard("hostile.group", name),
    }


def calls_with_group(layer, name):
    return {
        "group_add": lambda: layer.group_add(name, "hostile.channel"),
        "group_discard": lambda: layer.group_discard(name, "hostile.channel"),
        "group_send": lambda: layer.group_send(name, {"type": "x"}),
    }


def refused_like_channels(call, expected):
    with pytest.raises(Exception) as raised:
        asyncio.run(call())
    assert isinstance(raised.value, expected), repr(raised.value)
    return raised.value


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_names_are_refused_as_channels_refuses_them(make_layer, name):
    layer = make_layer()
    before = stats(handle_of(layer))
    expected = oracle(ORACLE.require_valid_channel_name, name)
    assert expected is not None
    for method, call in calls_with_channel(layer, name).items():
        refused_like_channels(call, expected)
    expected = oracle(ORACLE.require_valid_group_name, name)
    for method, call in calls_with_group(layer, name).items():
        refused_like_channels(call, expected)
    after = stats(handle_of(layer))
    assert after["sent"] == before["sent"] and after["used_members"] == 0
    asyncio.run(layer.send("hostile.after", {"type": "ok"}))


@pytest.mark.parametrize("name", GOOD_ODD_NAMES, ids=repr)
def test_odd_but_valid_names_work(make_layer, name):
    layer = make_layer()
    assert oracle(ORACLE.require_valid_channel_name, name) is None

    async def go():
        await layer.send(name, {"type": "odd"})
        if "!" not in name:
            assert await asyncio.wait_for(layer.receive(name), 1) == {"type": "odd"}

    asyncio.run(go())


def test_name_too_long_in_bytes_is_a_clear_type_error(make_layer):
    """Channels counts characters; the segment stores up to 99 bytes."""
    layer = make_layer()
    name = "abc!" + "é" * 90
    assert oracle(ORACLE.require_valid_channel_name, name) is None
    for call in calls_with_channel(layer, name).values():
        error = refused_like_channels(call, TypeError)
        assert "bytes in UTF-8" in str(error) and "99" in str(error)


def test_bad_new_channel_prefix_is_refused(make_layer):
    layer = make_layer()
    for prefix in ["bad prefix", "a!b", "x" * 95, "é"]:
        with pytest.raises(TypeError):
            asyncio.run(layer.new_channel(prefix))
    assert "!" in asyncio.run(layer.new_channel("fine"))


class Unpackable:
    pass


BAD_MESSAGES = {
    "list": ["not", "a", "dict"],
    "str": "text",
    "none": None,
    "int": 5,
    "bytes": b"x",
    "set value": {"a": {1, 2}},
    "object value": {"a": Unpackable()},
    "datetime value": {"when": datetime.datetime(2024, 1, 1)},
    "complex value": {"z": 1j},
    "int too big": {"n": 2**70},
    "int key": {1: "one"},
    "tuple key deep": {"a": [{"b": {(1, 2): 3}}]},
    "surrogate": {"s": "\ud800"},
    "nested too deeply": None,  # built below
}


#: The key each refusal must name.
NAMED_KEY = {
    "set value": "a",
    "object value": "a",
    "datetime value": "when",
    "complex value": "z",
    "int too big": "n",
    "int key": 1,
    "tuple key deep": (1, 2),
    "surrogate": "s",
}


def deeply_nested(depth=100_000):
    top = []
    inner = top
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return {"deep": top}


@pytest.mark.parametrize("kind", sorted(BAD_MESSAGES))
def test_bad_messages_are_refused_and_nothing_is_stored(make_layer, kind):
    layer = make_layer()
    message = deeply_nested() if kind == "nested too deeply" else BAD_MESSAGES[kind]
    layer.group_add_sync("hostile.group", "hostile.member")
    before = stats(handle_of(layer))
    for send in (
        lambda: layer.send("hostile.channel", message),
        lambda: layer.group_send("hostile.group", message),
    ):
        with pytest.raises((TypeError, AssertionError)) as raised:
            asyncio.run(send())
        text = str(raised.value)
        assert "message" in text
        if kind in NAMED_KEY:
            assert repr(NAMED_KEY[kind]) in text, text
    after = stats(handle_of(layer))
    assert after["sent"] == before["sent"] and after["queued"] == before["queued"]
    assert after["used_blocks"] == before["used_blocks"]
    asyncio.run(layer.send("hostile.channel", {"type": "fine"}))


def test_oversize_message_is_refused_before_anything_is_written(make_layer):
    layer = make_layer(max_message_size=10_000)
    layer.group_add_sync("hostile.group", "hostile.member")
    before = stats(handle_of(layer))
    big = {"blob": b"x" * 10_001}
    for send in (
        lambda: layer.send("hostile.channel", big),
        lambda: layer.group_send("hostile.group", big),
    ):
        with pytest.raises(MessageTooLarge) as raised:
            asyncio.run(send())
        assert "max_message_size" in str(raised.value)
        assert "10000" in str(raised.value)
    after = stats(handle_of(layer))
    assert after["sent"] == before["sent"] and after["used_blocks"] == 0
    asyncio.run(layer.send("hostile.channel", {"blob": b"x" * 9_000}))


def test_odd_but_sendable_values_round_trip(make_layer):
    layer = make_layer()
    message = {
        "type": "odd",
        "empty": {},
        "nested": [[[{"k": [None, True, False]}]]],
        "float": float("inf"),
        "bytes": bytes(range(256)),
        "unicode": "\u2603\U0001f600",
        "big": 2**63 - 1,
        "small": -(2**63),
        "bytes key": {b"raw": 1},
    }

    async def go():
        await layer.send("odd.values", message)
        return await asyncio.wait_for(layer.receive("odd.values"), 1)

    assert asyncio.run(go()) == message


# The contract as a model.

CAPACITY = 3
NORMAL = ["st.a", "st.b", "st.small"]
SMALL_CAPACITY = 1  # st.small, through a channel_capacity pattern
GROUPS = ["st.g1", "st.g2"]
LAYERS = 2


class ContractMachine(RuleBasedStateMachine):
    """Two layers on one segment, and what the contract says they hold."""

    def __init__(self):
        super().__init__()
        self.prefix = unique_prefix("sm")
        config = {
            "prefix": self.prefix,
            "size": 1 << 20,
            "capacity": CAPACITY,
            "channel_capacity": {"st.small*": SMALL_CAPACITY},
            "expiry": 3600,
        }
        self.layers = [SharedMemoryChannelLayer(**config) for _ in range(LAYERS)]
        self.queues = collections.defaultdict(collections.deque)
        self.groups = collections.defaultdict(set)
        self.owner = {}  # specific channel -> layer index, or None once dead
        self.ids = itertools.count()
        self.delivered = set()
        for index in range(LAYERS):
            self._make_specific(index)

    def teardown(self):
        for layer in self.layers:
            layer.close_sync()
        unlink_segment(segment_name(self.prefix))

    def _run(self, coroutine):
        return asyncio.run(coroutine)

    def _make_specific(self, index):
        for _ in range(2):
            name = self._run(self.layers[index].new_channel())
            self.owner[name] = index

    def _channels(self):
        return NORMAL + sorted(self.owner)

    @staticmethod
    def _capacity(channel):
        return SMALL_CAPACITY if channel.startswith("st.small") else CAPACITY

    @rule(data=st.data(), who=st.integers(0, LAYERS - 1))
    def send(self, data, who):
        channel = data.draw(st.sampled_from(self._channels()))
        ident = next(self.ids)
        message = {"type": "st", "id": ident}
        queue = self.queues[channel]
        dead = channel in self.owner and self.owner[channel] is None
        if not dead and len(queue) >= self._capacity(channel):
            with pytest.raises(ChannelFull):
                self._run(self.layers[who].send(channel, message))
            return
        self._run(self.layers[who].send(channel, message))
        if not dead:  # to a dead process: dropped, counted dropped_dead
            queue.append(ident)

    @rule(data=st.data(), who=st.integers(0, LAYERS - 1))
    def receive(self, data, who):
        channel = data.draw(st.sampled_from(self._channels()))
        layer = self.layers[who]
        if channel in self.owner and self.owner[channel] != who:
            with pytest.raises(ForeignChannel):
                self._run(layer.receive(channel))
            return
        queue = self.queues[channel]
        if not queue:
            with pytest.raises(asyncio.TimeoutError):
                self._run(asyncio.wait_for(layer.receive(channel), 0.01))
            return
        got = self._run(asyncio.wait_for(layer.receive(channel), 2))
        expected = queue.popleft()
        assert got == {"type": "st", "id": expected}, (channel, got, expected)
        assert (channel, expected) not in self.delivered
        self.delivered.add((channel, expected))

    @rule(data=st.data(), who=st.integers(0, LAYERS - 1), group=st.sampled_from(GROUPS))
    def group_add(self, data, who, group):
        channel = data.draw(st.sampled_from(self._channels()))
        self._run(self.layers[who].group_add(group, channel))
        if self.owner.get(channel, who) is not None:
            self.groups[group].add(channel)

    @rule(data=st.data(), who=st.integers(0, LAYERS - 1), group=st.sampled_from(GROUPS))
    def group_discard(self, data, who, group):
        channel = data.draw(st.sampled_from(self._channels()))
        self._run(self.layers[who].group_discard(group, channel))
        self.groups[group].discard(channel)

    @rule(who=st.integers(0, LAYERS - 1), group=st.sampled_from(GROUPS))
    def group_send(self, who, group):
        ident = next(self.ids)
        self._run(self.layers[who].group_send(group, {"type": "st", "id": ident}))
        for channel in self.groups[group]:
            queue = self.queues[channel]
            if len(queue) < self._capacity(channel):
                queue.append(ident)

    @rule(who=st.integers(0, LAYERS - 1))
    def flush(self, who):
        self._run(self.layers[who].flush())
        self.queues.clear()
        self.groups.clear()

    @rule(who=st.integers(0, LAYERS - 1))
    def close_and_come_back(self, who):
        """A layer leaves (its specific channels die with their messages
        and memberships) and is used again, under a new client name."""
        self._run(self.layers[who].close())
        for channel, owner in self.owner.items():
            if owner == who:
                self.owner[channel] = None
                self.queues.pop(channel, None)
                for members in self.groups.values():
                    members.discard(channel)
        self._make_specific(who)

    @invariant()
    def segment_agrees_with_the_model(self):
        numbers = stats(handle_of(self.layers[0]))
        assert identity_holds(numbers)
        assert numbers["queued"] == sum(len(q) for q in self.queues.values())
        assert numbers["used_members"] == sum(len(m) for m in self.groups.values())


TestContract = ContractMachine.TestCase
TestContract.settings = settings(
    max_examples=int(os.environ.get("DMB_CONTRACT_EXAMPLES", "50")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
