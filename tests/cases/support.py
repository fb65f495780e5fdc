"""Process plumbing for the failure-case tests.

A case runs its steps in real OS processes started with the multiprocessing
"spawn" method, so every child is a fresh interpreter that builds its own
layer, exactly as separate workers of a site do.  A child is an ``async``
function of this package, called as ``child(link, *args)``; it talks to the
test through a ``Link`` (two queues) with tagged messages, and whatever it
returns, or the traceback it dies with, goes back to the test.

This module imports neither pytest nor the suite's conftest, so a spawned
child pays only for dmb itself.
"""

import asyncio
import multiprocessing
import pickle
import queue
import time
import traceback

SPAWN = multiprocessing.get_context("spawn")

#: Small segments keep set-up fast; a case that queues more passes ``size``.
TEST_SIZE = 4 * 1024 * 1024


def build_layer(prefix, **config):
    """A layer on ``prefix``: every process of a case builds its own."""
    from dmb import SharedMemoryChannelLayer

    config.setdefault("size", TEST_SIZE)
    return SharedMemoryChannelLayer(prefix=prefix, **config)


def remove_segment(prefix):
    from dmb.segment import segment_name, unlink_segment

    unlink_segment(segment_name(prefix))


async def receive_or_none(layer, channel, timeout):
    """One receive with a deadline: the message, or None if nothing came."""
    try:
        return await asyncio.wait_for(layer.receive(channel), timeout)
    except TimeoutError:
        return None


async def drain(layer, channel, idle=1.0):
    """Receive until nothing arrives for ``idle`` seconds."""
    messages = []
    while True:
        message = await receive_or_none(layer, channel, idle)
        if message is None:
            return messages
        messages.append(message)


async def nothing_arrives(layer, channel, timeout):
    """True if a receive with this timeout raises TimeoutError."""
    try:
        message = await asyncio.wait_for(layer.receive(channel), timeout)
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected message on {channel!r}: {message!r}")


class ChildFailed(AssertionError):
    """A child process raised; the message carries its traceback."""


class Link:
    """Two queues between the test and one child, carrying (tag, value).

    Both ends wait in a thread, so an event loop running receives in the
    same process keeps running while it waits for the other side.  Values
    are pickled when put, not later in the queue's feeder thread, so the
    sender may change them straight after.
    """

    def __init__(self, name):
        self.name = name
        self.proc = None  # set by Children.start, on the test side only
        self.up = SPAWN.Queue()  # child -> test
        self.down = SPAWN.Queue()  # test -> child

    def __getstate__(self):
        # The child gets the queues, not the Process object that runs it.
        return {**self.__dict__, "proc": None}

    # Child side.

    def send(self, tag, value=None):
        self.up.put(pickle.dumps((tag, value)))

    async def wait(self, tag, timeout=60.0):
        return await _expect(self.down, tag, timeout, f"{self.name} waiting")

    # Test side.

    def tell(self, tag, value=None):
        self.down.put(pickle.dumps((tag, value)))

    async def expect(self, tag, timeout=30.0):
        return await _expect(self.up, tag, timeout, self.name, self.proc)


async def _expect(q, tag, timeout, who, proc=None):
    deadline = time.monotonic() + timeout
    while True:
        # Short waits, so a child killed by a signal (which sends nothing)
        # is reported at once instead of at the deadline.
        step = min(0.5, max(0.0, deadline - time.monotonic()))
        try:
            data = await asyncio.to_thread(q.get, True, step)
            break
        except queue.Empty:
            pass
        if proc is not None and proc.exitcode is not None:
            try:
                data = q.get(True, 0.5)  # it may have said something last
                break
            except queue.Empty:
                raise AssertionError(
                    f"{who} exited with code {proc.exitcode} before sending {tag!r}"
                ) from None
        if time.monotonic() >= deadline:
            raise AssertionError(f"{who}: no {tag!r} message within {timeout} s")
    got, value = pickle.loads(data)
    if got == "error":
        raise ChildFailed(f"{who} failed:\n{value}")
    if got != tag:
        raise AssertionError(f"{who}: expected {tag!r}, got {got!r}: {value!r}")
    return value


def catch_loop_errors(loop):
    """Collect what the loop would only log: errors in callbacks (such as a
    reader callback) and exceptions nobody retrieved."""
    errors = []

    def handler(loop, context):
        errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    loop.set_exception_handler(handler)
    return errors


async def _run_checked(func, link, args):
    errors = catch_loop_errors(asyncio.get_running_loop())
    result = await func(link, *args)
    await asyncio.sleep(0)  # let callbacks already due run, and be checked
    if errors:
        raise AssertionError(f"the event loop reported errors: {errors}")
    return result


def child_main(func, link, args):
    """Entry point of every spawned child: run ``func`` and report."""
    try:
        result = asyncio.run(_run_checked(func, link, args))
    except BaseException:  # noqa: BLE001 - whatever it was, the test must hear
        link.send("error", traceback.format_exc())
        raise SystemExit(1)
    link.send("result", result)


class Children:
    """The child processes of one test; whatever is left is killed at the end."""

    def __init__(self):
        self.procs = []

    def start(self, func, *args, name=None):
        link = Link(name or func.__name__)
        proc = SPAWN.Process(
            target=child_main, args=(func, link, args), name=link.name, daemon=True
        )
        proc.start()
        link.proc = proc
        self.procs.append(proc)
        return link

    async def join(self, links, timeout):
        """Wait for these children to exit; each must exit with code 0."""
        deadline = time.monotonic() + timeout
        for link in links:
            left = max(0.0, deadline - time.monotonic())
            await asyncio.to_thread(link.proc.join, left)
        codes = {link.name: link.proc.exitcode for link in links}
        assert all(code == 0 for code in codes.values()), f"exit codes: {codes}"

    def cleanup(self):
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(5)


# BR-01: receives cancelled at random while sibling channels keep reading.


async def br01_siblings(link, prefix, config, count):
    """Process R: channels a and b read steadily, c keeps cancelling."""
    import random

    layer = build_layer(prefix, **config)
    a, b, c = [await layer.new_channel() for _ in range(3)]
    for channel in (a, b, c):
        await layer.group_add("room", channel)
    logs = {a: [], b: [], c: []}
    last = count - 1
    cancels = 0

    async def steady(channel):
        while True:
            message = await layer.receive(channel)
            logs[channel].append(message["seq"])
            if message["seq"] == last:
                return

    async def reconnecting(channel):
        # A client that keeps dropping: each receive gets 0-5 ms to finish
        # before it is cancelled, and a new one starts at once.
        nonlocal cancels
        rng = random.Random()
        while True:
            task = asyncio.ensure_future(layer.receive(channel))
            done, _ = await asyncio.wait({task}, timeout=rng.uniform(0, 0.005))
            if not done:
                task.cancel()
            try:
                message = await task
            except asyncio.CancelledError:
                cancels += 1
                continue
            logs[channel].append(message["seq"])
            if message["seq"] == last:
                return

    loops = [
        asyncio.ensure_future(steady(a)),
        asyncio.ensure_future(steady(b)),
        asyncio.ensure_future(reconnecting(c)),
    ]
    link.send("ready")
    await link.wait("sent", timeout=120)
    # Everything is queued by now; a correct layer finishes in well under
    # a second.  The deadline only bounds a layer that lost the last seq.
    done, pending = await asyncio.wait(loops, timeout=15)
    for task in pending:
        task.cancel()
    for task in done:
        task.result()  # re-raise anything a loop raised
    await layer.close()
    return {
        "a": logs[a],
        "b": logs[b],
        "c": logs[c],
        "cancels": cancels,
        "unfinished": len(pending),
    }


# BR-02: capacity per channel, and group_send past a full member.


async def br02_members(link, prefix, config):
    """Process B: three channels in group g; drains them when told."""
    layer = build_layer(prefix, **config)
    c1 = await layer.new_channel(prefix="one")
    c2 = await layer.new_channel(prefix="two")
    t = await layer.new_channel(prefix="tiny")
    for channel in (c1, c2, t):
        await layer.group_add("g", channel)
    link.send("channels", (c1, c2, t))
    await link.wait("drain")
    # One after another, each until a 1 s receive times out.
    link.send("drained", [await drain(layer, ch, idle=1.0) for ch in (c1, c2, t)])
    await link.wait("again")
    again = await asyncio.gather(*(drain(layer, ch, idle=1.0) for ch in (c1, c2, t)))
    link.send("again", list(again))
    await layer.close()


# BR-04: membership expiry, refreshes, and groups that do not exist.


async def br04_members(link, prefix, config):
    """Process B: a and b in g, a and three more in g2; b refreshed at 1.8 s."""
    layer = build_layer(prefix, **config)
    a, b = await layer.new_channel(), await layer.new_channel()
    others = [await layer.new_channel() for _ in range(3)]
    t0 = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process
    await layer.group_add("g", a)
    await layer.group_add("g", b)
    for channel in (a, *others):
        await layer.group_add("g2", channel)
    link.send("channels", {"a": a, "b": b, "others": others, "t0": t0})
    await asyncio.sleep(max(0.0, t0 + 1.8 - time.monotonic()))
    await layer.group_add("g", b)
    link.send("refreshed", time.monotonic() - t0)

    await link.wait("sent")
    # Step 5: all at once, each with its own 1 s timeout.
    got = await asyncio.gather(
        drain(layer, b, idle=1.0),
        drain(layer, a, idle=1.0),
        *(drain(layer, channel, idle=1.0) for channel in others),
    )
    link.send("step5", {"b": got[0], "a": got[1], "others": got[2:]})

    await link.wait("step6")
    b_got, a_got = await asyncio.gather(
        drain(layer, b, idle=1.0), drain(layer, a, idle=1.0)
    )
    link.send("step6", {"b": b_got, "a": a_got})
    await layer.close()


# BR-06: one normal channel read by several worker processes.


async def br06_worker(link, prefix, config, go):
    """Read "jobs" (no new_channel) until it has been quiet for 2 s."""
    layer = build_layer(prefix, **config)
    link.send("ready")
    await asyncio.to_thread(go.wait, 60)
    records = []
    while True:
        message = await receive_or_none(layer, "jobs", 2.0)
        if message is None:
            break
        records.append((message.get("producer"), message["seq"]))
    await layer.close()
    return records


async def br06_producer(link, prefix, config, go, seqs, producer=None):
    """Send seqs to "jobs" as fast as possible; on ChannelFull, wait and resend."""
    from channels.exceptions import ChannelFull

    layer = build_layer(prefix, **config)
    link.send("ready")
    await asyncio.to_thread(go.wait, 60)
    full = 0
    for seq in seqs:
        message = {"type": "job", "seq": seq}
        if producer is not None:
            message["producer"] = producer
        while True:
            try:
                await layer.send("jobs", message)
                break
            except ChannelFull:
                full += 1
                await asyncio.sleep(0.01)
    await layer.close()
    return full


# BR-07: what goes in comes out, and what cannot come out never goes in.


async def br07_reader(link, prefix, config, group):
    """Process B: receive on its channel until both "after" messages came."""
    layer = build_layer(prefix, **config)
    channel = await layer.new_channel()
    await layer.group_add(group, channel)
    link.send("channel", channel)
    got = []
    while len([m for m in got if m.get("type") == "after"]) < 2:
        message = await receive_or_none(layer, channel, 20.0)
        if message is None:
            break
        got.append(message)
    # Anything that sneaked in behind the last one would show up here.
    got.extend(await drain(layer, channel, idle=0.5))
    await layer.close()
    return got


# BR-08: the caller's dict is never changed, and receivers never share one.


async def br08_owner(link, prefix, config):
    """Process R: owns a and b, and reads the normal channel "plain"."""
    import copy

    layer = build_layer(prefix, **config)
    a, b = await layer.new_channel(), await layer.new_channel()
    link.send("channels", (a, b))
    await link.wait("sent")
    a_direct = await asyncio.wait_for(layer.receive(a), 5)
    a_group = await asyncio.wait_for(layer.receive(a), 5)
    a_group_as_received = copy.deepcopy(a_group)
    a_group["payload"]["x"] = 99
    b_direct = await asyncio.wait_for(layer.receive(b), 5)
    b_group = await asyncio.wait_for(layer.receive(b), 5)
    plain = await asyncio.wait_for(layer.receive("plain"), 5)
    copies = [a_direct, a_group, b_direct, b_group, plain]
    link.send(
        "received",
        {
            "a_direct": a_direct,
            "a_group": a_group_as_received,
            "b_direct": b_direct,
            "b_group": b_group,
            "plain": plain,
            # Identity only means something inside this process.
            "distinct_dicts": len({id(m) for m in copies}),
            "distinct_payloads": len({id(m["payload"]) for m in copies}),
        },
    )
    reserved = await link.wait("reserved")
    if reserved == "sent":
        link.send("reserved", await receive_or_none(layer, a, 5.0))
    await layer.close()


# BR-09: receiving on another process's channel.


async def br09_owner(link, prefix, config):
    """Process A: makes ch, then reports what arrives on it."""
    layer = build_layer(prefix, **config)
    channel = await layer.new_channel()
    link.send("channel", channel)
    link.send("got", await receive_or_none(layer, channel, 10.0))
    await layer.close()


def segment_counts(layer):
    """What the segment holds: queued messages, channels, groups, members."""
    from dmb._ring_cffi import ffi, lib

    stats = ffi.new("struct dmb_stats *")
    lib.dmb_stats(layer._segment.handle, stats)
    return {
        "queued": stats.queued,
        "channels": stats.used_channels,
        "groups": stats.used_groups,
        "members": stats.used_members,
        "sent": stats.counters.sent,
    }


# BR-10: one producer's order survives group_send and send mixed.


async def br10_reader(link, prefix, config, channel_count, read_status, counts):
    """Make channels, join "progress", and read until each has its count."""
    layer = build_layer(prefix, **config)
    channels = [await layer.new_channel() for _ in range(channel_count)]
    for channel in channels:
        await layer.group_add("progress", channel)
    link.send("channels", channels)
    if read_status:
        channels.append("status")

    async def read(channel, count):
        got = []
        while len(got) < count:
            message = await receive_or_none(layer, channel, 10.0)
            if message is None:
                break
            got.append(message)
        return got

    got = await asyncio.gather(*(read(c, n) for c, n in zip(channels, counts)))
    # Nothing more may come after the expected count.
    extra = await asyncio.gather(*(drain(layer, c, idle=0.5) for c in channels))
    await layer.close()
    return {"got": list(got), "extra": list(extra)}


# BR-13: segment lifecycle.


async def br13_boot_sender(link, prefix, barrier):
    """Part A: build the layer the moment the barrier drops, say hello."""
    import os

    await asyncio.to_thread(barrier.wait)
    layer = build_layer(prefix)
    await layer.send("boot", {"pid": os.getpid()})
    await layer.close()


async def br13_boot_receiver(link, prefix, barrier, count):
    """Part A: build the layer with the others, collect their hellos."""
    await asyncio.to_thread(barrier.wait)
    layer = build_layer(prefix)
    pids = []
    while len(pids) < count:
        message = await receive_or_none(layer, "boot", 10.0)
        if message is None:
            break
        pids.append(message["pid"])
    await layer.close()
    return pids


async def br13_round_trip(link, prefix, size):
    """Part B: build over a leftover object; one send and receive."""
    try:
        layer = build_layer(prefix, size=size)
    except Exception as exc:  # noqa: BLE001 - refusing is allowed, if it says why
        return {"refused": f"{type(exc).__name__}: {exc}"}
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "t", "n": 1})
    got = await receive_or_none(layer, channel, 5.0)
    await layer.close()
    return {"got": got}


async def br13_small(link, prefix, size):
    """Part C, process A: the smallest segment, one message left pending."""
    layer = build_layer(prefix, size=size)
    await layer.send("pending", {"type": "pending"})
    mine = await layer.new_channel()
    link.send("channel", {"channel": mine, "max": layer.max_message_size})

    async def answer():
        ping = await layer.receive(mine)
        await layer.send(ping["reply"], {"type": "pong"})
        return ping

    server = asyncio.ensure_future(answer())
    command = await link.wait("next")
    result = {}
    if command == "read":  # B could not attach: the message is still ours
        result["pending"] = await receive_or_none(layer, "pending", 5.0)
    if server.done():
        result["ping"] = server.result()
    else:
        server.cancel()
    await layer.close()
    return result


async def br13_bigger(link, prefix, size, a_channel):
    """Part C, process B: same prefix, a much larger size."""
    try:
        layer = build_layer(prefix, size=size)
    except Exception as exc:  # noqa: BLE001 - the test judges the message
        return {"refused": f"{type(exc).__name__}: {exc}"}
    pending = await receive_or_none(layer, "pending", 5.0)
    mine = await layer.new_channel()
    await layer.send(a_channel, {"type": "ping", "reply": mine})
    pong = await receive_or_none(layer, mine, 5.0)
    await layer.close()
    # A message limit set explicitly for the larger size cannot be kept.
    try:
        explicit = build_layer(prefix, size=size, max_message_size=size // 4)
    except Exception as exc:  # noqa: BLE001 - the test judges the message
        explicit = f"{type(exc).__name__}: {exc}"
    else:
        await explicit.close()
        explicit = explicit.max_message_size
    return {
        "pending": pending,
        "pong": pong,
        "max": layer.max_message_size,
        "explicit": explicit,
    }


async def br13_flush_b(link, prefix):
    """Part D, process B (flushed prefix): a member, a receive left waiting."""
    layer = build_layer(prefix)
    member = await layer.new_channel()
    await layer.group_add("g", member)
    waiting = asyncio.ensure_future(layer.receive("q2"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    link.send("ready", member)
    await link.wait("flushed")
    alive = not waiting.done()
    after_flush = await receive_or_none(layer, "q", 0.5)
    # Nothing has been sent to q2 yet: its receive must still be waiting.
    alive = alive and not waiting.done()
    link.send("q", after_flush)
    await link.wait("sent")
    group_got = await receive_or_none(layer, member, 0.5)
    fresh = await receive_or_none(layer, "q", 1.0)
    q2 = await asyncio.wait_for(waiting, 1.0)
    await layer.close()
    return {"alive": alive, "group": group_got, "fresh": fresh, "q2": q2}


async def br13_flush_c(link, prefix):
    """Part D, process C (other prefix): must not notice the flush."""
    layer = build_layer(prefix)
    member = await layer.new_channel()
    await layer.group_add("g", member)
    await layer.send("q", {"n": "p2"})
    link.send("ready")
    await link.wait("flushed")
    pending = await receive_or_none(layer, "q", 1.0)
    await layer.group_send("g", {"n": "p2-group"})
    group_got = await receive_or_none(layer, member, 1.0)
    await layer.close()
    return {"pending": pending, "group": group_got}


# BR-16: one big group, and concurrent group_send while members come and go.


async def br16_receiver(link, prefix, config, count, first, second, churn):
    """Hold ``count`` members of "all", each with a receive always waiting.

    Reports when every member has the first ``first`` messages (part A),
    then, told "b", reads the next ``second``; with ``churn`` it also adds
    and discards short-lived members of its own meanwhile.
    """
    layer = build_layer(prefix, **config)
    channels = [await layer.new_channel() for _ in range(count)]
    for channel in channels:
        await layer.group_add("all", channel)
    logs = {channel: [] for channel in channels}
    part_a = {"left": count, "at": 0.0, "done": asyncio.Event()}

    async def reader(channel):
        log = logs[channel]
        while len(log) < first + second:
            message = await layer.receive(channel)
            log.append(next(iter(message.items())))
            if len(log) == first:
                part_a["left"] -= 1
                if part_a["left"] == 0:
                    part_a["at"] = time.monotonic()
                    part_a["done"].set()

    readers = [asyncio.ensure_future(reader(channel)) for channel in channels]
    await asyncio.sleep(0.1)  # every reader is now inside its receive()
    assert not any(task.done() for task in readers)
    link.send("ready")
    await asyncio.wait_for(part_a["done"].wait(), 60)
    link.send("a-done", part_a["at"])

    await link.wait("b")
    short_lived = []
    all_read = asyncio.ensure_future(asyncio.wait(readers, timeout=30))
    while churn and not all_read.done():
        channel = await layer.new_channel()
        await layer.group_add("all", channel)
        await asyncio.sleep(0.001)
        await layer.group_discard("all", channel)
        short_lived.append(channel)
    _, unfinished = await all_read
    for task in unfinished:
        task.cancel()
    # Anything past the expected count, and what the short-lived ones got.
    extra = await asyncio.gather(*(drain(layer, c, idle=0.5) for c in channels))
    churned = await asyncio.gather(*(drain(layer, c, idle=0.5) for c in short_lived))
    await layer.close()
    return {
        "logs": list(logs.values()),
        "extra": sum(len(e) for e in extra),
        "churned": [[m["c"] for m in got] for got in churned],
    }


async def br13_die_busy(link, prefix, size):
    """Part B, a previous run: leave messages and memberships, then wait
    for the test to kill it (SIGKILL: no atexit, no slot release)."""
    layer = build_layer(prefix, size=size)
    mine = await layer.new_channel()
    await layer.group_add("g", mine)
    await layer.send(mine, {"type": "lost"})
    await layer.send("q", {"type": "kept"})
    link.send("channel", mine)
    await link.wait("never", timeout=60)
