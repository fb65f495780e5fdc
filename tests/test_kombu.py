"""dmb.kombu: the kombu transport over a segment, without Celery.

Every test has its own segment (the ``prefix`` fixture removes it).  The
crash tests run real processes that die by SIGKILL.
"""

import datetime
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time

import pytest

kombu = pytest.importorskip("kombu")

from kombu import Connection, Consumer, Exchange, Producer, Queue  # noqa: E402
from kombu.asynchronous import Hub  # noqa: E402

import dmb.kombu as dk  # noqa: E402
from dmb import ConfigError  # noqa: E402
from dmb._ring_cffi import ffi, lib  # noqa: E402
from dmb.segment import process_start_time  # noqa: E402

pytestmark = pytest.mark.timeout(30)

SIZE = 4 * 1024 * 1024


def url(prefix, **query):
    query.setdefault("size", SIZE)
    return f"dmb://{prefix}?" + "&".join(f"{k}={v}" for k, v in query.items())


@pytest.fixture
def connect(prefix):
    """Open kombu connections on this test's segment; closed at the end."""
    opened = []

    def make(**query):
        conn = Connection(url(prefix, **query))
        conn.connect()
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.release()


def publish(conn, body, **kwargs):
    with conn.channel() as channel:
        Producer(channel).publish(body, **kwargs)


def collect(conn, queues, count, ack=True, timeout=5):
    """Drain until ``count`` messages arrived; returns (body, message)."""
    got = []

    def on_message(body, message):
        got.append((body, message))
        if ack:
            message.ack()

    channel = conn.channel()
    with Consumer(channel, queues, callbacks=[on_message], accept=None):
        deadline = time.monotonic() + timeout
        while len(got) < count:
            conn.drain_events(timeout=max(0.01, deadline - time.monotonic()))
    return got


def summary(conn, queue):
    for entry in dk.queue_summary(conn.transport.client_segment().segment):
        if entry["queue"] == queue:
            return entry
    return None


def ready(conn, queue):
    entry = summary(conn, queue)
    return entry["ready"] if entry else 0


# Configuration.


def test_url_names_the_prefix_with_its_case_and_options(prefix):
    options = dk.parse_options("dmb://MySite_1?size=2097152&mode=640", {})
    assert options == {
        "prefix": "MySite_1",
        "size": 2097152,
        "mode": 0o640,
        "recover_interval": dk.DEFAULT_RECOVER_INTERVAL,
    }
    options = dk.parse_options("dmb://", {"prefix": "other", "recover_interval": 1})
    assert options["prefix"] == "other"
    assert options["recover_interval"] == 1.0
    assert dk.parse_options("dmb://", {})["prefix"] == dk.DEFAULT_PREFIX


@pytest.mark.parametrize(
    "bad, word",
    [
        ("dmb://x?colour=red", "colour"),
        ("dmb://x?size=10", "size"),
        ("dmb://x?mode=0o400", "mode"),
        ("dmb://x?recover_interval=0", "recover_interval"),
        ("dmb://bad%20prefix", "prefix"),
    ],
)
def test_a_wrong_option_is_an_error_naming_it(bad, word):
    with pytest.raises(ConfigError, match=word):
        dk.parse_options(bad, {})


def test_the_dmb_scheme_is_registered_and_the_url_kept(connect):
    conn = connect()
    assert conn.transport_cls == "dmb"
    assert isinstance(conn.transport, dk.Transport)
    assert conn.as_uri().startswith("dmb://")
    assert Connection("dmb://x", transport="dmb.kombu:Transport").transport_cls


# Routing, properties and headers.


def test_direct_topic_and_fanout_routing_across_connections(connect):
    consumer_conn, producer_conn = connect(), connect()
    direct = Exchange("tasks", type="direct")
    topic = Exchange("events", type="topic")
    fanout = Exchange("broadcast", type="fanout")
    work = Queue("work", direct, routing_key="work")
    other = Queue("other", direct, routing_key="other")
    heartbeats = Queue("beats", topic, routing_key="worker.#")
    everything = Queue("all-events", topic, routing_key="#")
    fan_a, fan_b = Queue("fan-a", fanout), Queue("fan-b", fanout)
    queues = [work, other, heartbeats, everything, fan_a, fan_b]
    with consumer_conn.channel() as channel:
        for queue in queues:
            queue(channel).declare()

    # The producer never declared these exchanges: the segment told it
    # their types and bindings.
    publish(producer_conn, "w", exchange="tasks", routing_key="work")
    publish(producer_conn, "hb", exchange="events", routing_key="worker.heartbeat")
    publish(producer_conn, "task", exchange="events", routing_key="task.sent")
    publish(producer_conn, "all", exchange="broadcast")

    got = collect(consumer_conn, queues, 6)
    seen = sorted((m.delivery_info["routing_key"], b) for b, m in got)
    assert seen == [
        ("", "all"),
        ("", "all"),
        ("task.sent", "task"),
        ("work", "w"),
        ("worker.heartbeat", "hb"),
        ("worker.heartbeat", "hb"),
    ]
    assert ready(consumer_conn, "other") == 0


def test_properties_and_headers_arrive_as_sent(connect):
    conn = connect()
    queue = Queue("props")
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    with conn.channel() as channel:
        queue(channel).declare()
    publish(
        conn,
        b"\x00\x01binary",
        routing_key="props",
        content_type="application/x-raw",
        content_encoding="binary",
        headers={"task": "t", "list": [1, "two", None], "when": when},
        correlation_id="corr-1",
        reply_to="replies",
        priority=7,
    )
    [(body, message)] = collect(conn, [queue], 1)
    assert body == b"\x00\x01binary"
    assert message.content_type == "application/x-raw"
    assert message.headers == {"task": "t", "list": [1, "two", None], "when": when}
    assert message.properties["correlation_id"] == "corr-1"
    assert message.properties["reply_to"] == "replies"
    assert message.properties["priority"] == 7


def test_an_expired_message_is_never_delivered(connect):
    conn = connect()
    queue = Queue("ttl")
    with conn.channel() as channel:
        queue(channel).declare()
    publish(conn, "old", routing_key="ttl", expiration=0.05)
    publish(conn, "fresh", routing_key="ttl")
    time.sleep(0.1)
    [(body, _)] = collect(conn, [queue], 1)
    assert body == "fresh"
    assert ready(conn, "ttl") == 0


# Lifetimes and acknowledgements.


def test_queued_messages_outlive_their_connections(connect):
    first = connect()
    with first.channel() as channel:
        Queue("keep")(channel).declare()
    for n in range(3):
        publish(first, n, routing_key="keep")
    first.release()
    got = collect(connect(), [Queue("keep")], 3)
    assert [body for body, _ in got] == [0, 1, 2]


def test_unacked_messages_wait_in_the_segment_until_settled(connect):
    conn = connect()
    queue = Queue("acks")
    with conn.channel() as channel:
        queue(channel).declare()
    for body in ("a", "b", "c"):
        publish(conn, body, routing_key="acks")
    got = collect(conn, [queue], 3, ack=False)
    entry = summary(conn, "acks")
    assert (entry["ready"], entry["unacked"]) == (0, 3)
    [owner] = entry["consumers"]
    assert owner["pid"] == os.getpid() and owner["alive"]

    got[0][1].ack()
    got[1][1].reject(requeue=True)
    got[2][1].reject(requeue=False)
    entry = summary(conn, "acks")
    assert (entry["ready"], entry["unacked"]) == (1, 0)
    [(body, message)] = collect(conn, [queue], 1)
    assert body == "b"


def test_closing_a_channel_returns_its_unacked_messages(connect):
    conn = connect()
    queue = Queue("closing")
    with conn.channel() as channel:
        queue(channel).declare()
    publish(conn, "x", routing_key="closing")
    channel = conn.channel()
    message = channel.basic_get("closing", no_ack=False)
    assert message is not None and summary(conn, "closing")["unacked"] == 1
    channel.close()
    assert summary(conn, "closing")["ready"] == 1
    assert collect(connect(), [queue], 1)[0][0] == "x"


def test_purge_size_and_delete(connect):
    conn = connect()
    queue = Queue("junk", Exchange("junk-x", type="direct"), routing_key="junk")
    with conn.channel() as channel:
        queue(channel).declare()
        for n in range(4):
            Producer(channel).publish(n, exchange="junk-x", routing_key="junk")
        assert channel.queue_declare("junk", passive=True).message_count == 4
        assert channel.queue_purge("junk") == 4
        channel.basic_publish(
            channel.prepare_message("x"), exchange="junk-x", routing_key="junk"
        )
        channel.queue_delete("junk")
        assert summary(conn, "junk") is None


def _consume_then_die(address, queue, ready):
    """In a child: take one message without acknowledging, then SIGKILL."""
    with Connection(address) as conn:
        channel = conn.channel()
        assert channel.basic_get(queue, no_ack=False) is not None
        ready.set()
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_consumers_messages_return_to_their_queue(prefix, connect):
    conn = connect(recover_interval=0.2)
    queue = Queue("crash")
    with conn.channel() as channel:
        queue(channel).declare()
    publish(conn, "survivor", routing_key="crash")
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    child = context.Process(
        target=_consume_then_die, args=(url(prefix), "crash", ready)
    )
    child.start()
    child.join(20)
    assert child.exitcode == -signal.SIGKILL and ready.is_set()
    entry = summary(conn, "crash")
    assert (entry["ready"], entry["unacked"]) == (0, 1)
    assert entry["consumers"][0]["alive"] is False

    # A consumer starting (and every recover_interval) gives it back.
    [(body, _)] = collect(conn, [queue], 1)
    assert body == "survivor"
    assert summary(conn, "crash") is None  # nothing ready, nothing pending


def test_a_reused_pid_is_not_taken_for_the_dead_owner(connect):
    """A slot that names this live pid with another start time is dead."""
    conn = connect()
    client = conn.transport.client_segment()
    with conn.channel() as channel:
        Queue("reuse")(channel).declare()
    publish(conn, "m", routing_key="reuse")
    h = client.h
    pid = os.getpid()
    wrong = process_start_time(pid) + 12345
    slot = lib.dmb_slot_acquire(h, pid, wrong, 99, b"reused", 6, 0)
    info = ffi.new("struct dmb_slot_info *")
    lib.dmb_slot_info(h, slot, info)
    pending = f"{dk.PENDING}{slot:x}.{info.gen:x}.1:reuse".encode()
    assert client.move_all(dk.queue_channel("reuse"), pending) == 1

    assert dk.recover(client) == 1
    assert summary(conn, "reuse")["ready"] == 1
    lib.dmb_slot_info(h, slot, info)
    assert not info.in_use  # reclaimed as well


def test_a_live_consumers_messages_stay_with_it(connect):
    conn = connect()
    with conn.channel() as channel:
        Queue("live")(channel).declare()
        publish(conn, "m", routing_key="live")
        assert channel.basic_get("live", no_ack=False) is not None
        assert dk.recover(connect().transport.client_segment()) == 0
        assert summary(conn, "live")["unacked"] == 1


def test_a_forked_child_leaves_its_parents_deliveries_alone(connect):
    conn = connect()
    with conn.channel() as channel:
        Queue("forked")(channel).declare()
    publish(conn, "m", routing_key="forked")
    channel = conn.channel()
    message = channel.basic_get("forked", no_ack=False)
    pid = os.fork()
    if pid == 0:  # the child closes what it inherited, as Celery's pool may
        try:
            channel.close()
            conn.release()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert summary(conn, "forked")["unacked"] == 1
    message.ack()
    assert summary(conn, "forked") is None


def test_an_auto_delete_queue_goes_with_its_owner(connect):
    owner_conn, other = connect(), connect()
    exchange = Exchange("replies", type="direct")
    queue = Queue("reply-1", exchange, routing_key="r1", auto_delete=True)
    with owner_conn.channel() as channel:
        queue(channel).declare()
    publish(other, "answer", exchange="replies", routing_key="r1")
    assert summary(other, "reply-1")["ready"] == 1
    owner_conn.release()
    assert summary(other, "reply-1") is None
    publish(other, "late", exchange="replies", routing_key="r1")
    assert summary(other, "reply-1") is None


# Waiting.


def test_drain_events_sleeps_until_a_message_arrives(connect):
    consumer_conn, producer_conn = connect(), connect()
    queue = Queue("wake")
    with consumer_conn.channel() as channel:
        queue(channel).declare()
    got = []
    cpu = []

    def consume():
        start = time.thread_time()
        got.extend(collect(consumer_conn, [queue], 1, timeout=10))
        cpu.append(time.thread_time() - start)

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(1.0)
    sent = time.monotonic()
    publish(producer_conn, "now", routing_key="wake")
    thread.join(10)
    assert got and got[0][0] == "now"
    assert time.monotonic() - sent < 0.5
    assert cpu[0] < 0.2  # a second of waiting cost (almost) nothing


def test_drain_events_times_out(connect):
    conn = connect()
    with conn.channel() as channel:
        Consumer(channel, [Queue("silence")], callbacks=[lambda b, m: None]).consume()
        start = time.monotonic()
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=0.3)
        assert 0.25 < time.monotonic() - start < 2


def test_the_event_loop_delivers_on_arrival(connect):
    consumer_conn, producer_conn = connect(), connect()
    queue = Queue("hubbed")
    with consumer_conn.channel() as channel:
        queue(channel).declare()
    hub = Hub()
    got = []
    channel = consumer_conn.channel()

    def on_message(body, message):
        got.append(body)
        message.ack()

    consumer = Consumer(channel, [queue], callbacks=[on_message])
    consumer.consume()
    consumer_conn.transport.register_with_event_loop(consumer_conn.connection, hub)
    loop = hub.create_loop()

    def spin(until, limit=5):
        deadline = time.monotonic() + limit
        while not until() and time.monotonic() < deadline:
            next(loop)

    for n in range(3):
        publish(producer_conn, n, routing_key="hubbed")
    spin(lambda: len(got) == 3)
    assert got == [0, 1, 2]
    threading.Timer(
        0.2, publish, (producer_conn, "later"), {"routing_key": "hubbed"}
    ).start()
    spin(lambda: len(got) == 4)
    assert got[-1] == "later"
    consumer.cancel()
    hub.close()


@pytest.mark.skipif(sys.platform != "linux", reason="names in /dev/shm")
def test_names_too_long_for_a_channel_are_hashed(connect):
    conn = connect()
    long_name = "q" * 120
    with conn.channel() as channel:
        Queue(long_name)(channel).declare()
    publish(conn, "far", routing_key=long_name)
    assert dk.queue_channel(long_name).startswith(b"kombu:q:#")
    assert collect(conn, [Queue(long_name)], 1)[0][0] == "far"
    assert dk.name_key("a!b").startswith("#")


def test_inspect_shows_celery_queues_with_their_unacked_owner(connect, prefix):
    import io
    import json

    from dmb import inspect as dmb_inspect
    from dmb.segment import segment_name

    conn = connect()
    queue = Queue("jobs", Exchange("jobs"), routing_key="jobs")
    publish(conn, {"n": 1}, exchange=queue.exchange, routing_key="jobs",
            declare=[queue])
    publish(conn, {"n": 2}, exchange=queue.exchange, routing_key="jobs")
    collect(conn, [queue], 1, ack=False)  # one delivered, not acknowledged

    out, err = io.StringIO(), io.StringIO()
    argv = ["--name", segment_name(prefix), "--json"]
    assert dmb_inspect.main(argv, stdout=out, stderr=err) == 0, err.getvalue()
    (jobs,) = [q for q in json.loads(out.getvalue())["celery"] if q["queue"] == "jobs"]
    assert (jobs["ready"], jobs["unacked"]) == (1, 1)
    assert [c["pid"] for c in jobs["consumers"]] == [os.getpid()]

    out = io.StringIO()
    assert dmb_inspect.main(argv[:2], stdout=out, stderr=err) == 0
    assert "CELERY QUEUES" in out.getvalue() and "jobs" in out.getvalue()
