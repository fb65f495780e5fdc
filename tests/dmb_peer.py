"""A separate process for dmb's own multi-process tests.

Run as ``python dmb_peer.py '<json spec>'``: the spec names an action and
the layer's CONFIG (the test's, so both meet in one segment).  Results are
JSON lines on stdout; some actions wait for JSON lines on stdin.
"""

import asyncio
import json
import os
import resource
import sys
import time

from channels.exceptions import ChannelFull
from dmb._ring_cffi import lib

from dmb import SharedMemoryChannelLayer


def emit(**result):
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


class Commands:
    """JSON lines from the test, read without blocking the event loop."""

    async def open(self):
        loop = asyncio.get_running_loop()
        self.reader = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(self.reader), sys.stdin
        )

    async def next(self):
        line = await self.reader.readline()
        if not line:
            raise SystemExit("peer: stdin closed")
        return json.loads(line)


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def run_seconds():
    """Time the kernel ran this process, from the scheduler's own clock.

    getrusage on this kind of VM sometimes charges a process that did not
    run at all (its scheduler run time stands still while getrusage moves
    by milliseconds), so the idle test asserts on this and reports both.
    """
    with open("/proc/self/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def wakeups():
    """(times scheduled in, voluntary context switches) of this process:
    what a failed idle check needs, to tell one stray tick from a timer."""
    with open("/proc/self/schedstat") as f:
        timeslices = int(f.read().split()[2])
    return timeslices, resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


async def idle(layer, spec, commands):
    """Hold many pending receives and measure this process's CPU meanwhile."""
    count = spec["receives"]
    specific = [await layer.new_channel() for _ in range(count // 2)]
    normal = [f"{spec['tag']}.idle.{i}" for i in range(count - count // 2)]
    names = specific + normal
    tasks = [asyncio.ensure_future(layer.receive(name)) for name in names]
    await asyncio.sleep(0.2)  # every receive reaches its wait
    assert not any(task.done() for task in tasks)
    emit(waiting=names)
    # Up to ``windows`` idle windows, stopping at the first that cost
    # nothing: on a shared VM a sleeping process is now and then charged a
    # stray tick, which a second window shows for what it is, while a layer
    # that polls pays in every window.
    windows = []
    for _ in range(spec.get("windows", 1)):
        user0, sys0 = cpu_seconds()
        run0, woken0 = run_seconds(), wakeups()
        await asyncio.sleep(spec["window"])
        run1, woken1 = run_seconds(), wakeups()
        user1, sys1 = cpu_seconds()
        windows.append(
            {
                "user": user1 - user0,
                "system": sys1 - sys0,
                "run": run1 - run0,
                "scheduled": woken1[0] - woken0[0],
                "voluntary_switches": woken1[1] - woken0[1],
            }
        )
        if f"{run1 - run0:.2f}" == "0.00":
            break
    emit(cpu={**min(windows, key=lambda w: w["run"]), "windows": windows})
    done = await asyncio.wait_for(asyncio.gather(*tasks), spec["timeout"])
    emit(received=done)


async def wait_receive(layer, spec, commands):
    """Wait on a channel (our own specific one if none is named)."""
    channel = spec.get("channel") or await layer.new_channel()
    started = time.monotonic()
    task = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0)
    emit(waiting=channel)
    message = await asyncio.wait_for(task, spec["timeout"])
    emit(message=message, waited=time.monotonic() - started)


async def send(layer, spec, commands):
    """Send the given messages to a channel when told to."""
    await commands.next()
    for message in spec["messages"]:
        await layer.send(spec["channel"], message)
    emit(sent=len(spec["messages"]))


async def try_receive(layer, spec, commands):
    """Receive on a channel we do not own; report how it failed."""
    started = time.monotonic()
    try:
        message = await asyncio.wait_for(
            layer.receive(spec["channel"]), spec["timeout"]
        )
    except Exception as exc:  # reported to the test, which judges it
        emit(
            error=type(exc).__name__,
            bases=[cls.__name__ for cls in type(exc).__mro__],
            text=str(exc),
            elapsed=time.monotonic() - started,
        )
    else:
        emit(message=message)


async def drain(layer, spec, commands):
    """Receive from a channel until a "stop" message.

    The channel is ``spec["channel"]`` or, if absent, a new specific one.
    With ``report_each``, every id is printed as it arrives; with ``pace``,
    it pauses that long after each message, as a slow consumer would.
    """
    channel = spec.get("channel") or await layer.new_channel()
    emit(channel=channel)
    ids = []
    while True:
        message = await asyncio.wait_for(layer.receive(channel), spec["timeout"])
        if message["type"] == "stop":
            break
        ids.append(message["id"])
        if spec.get("report_each"):
            emit(got=message["id"])
        if spec.get("pace"):
            await asyncio.sleep(spec["pace"])  # busy, not waiting
    emit(ids=ids)


async def drain_pairs(layer, spec, commands):
    """Receive from a channel until a "stop"; report (src, id) in order."""
    emit(channel=spec["channel"])
    pairs = []
    while True:
        message = await asyncio.wait_for(
            layer.receive(spec["channel"]), spec["timeout"]
        )
        if message["type"] == "stop":
            break
        pairs.append((message["src"], message["id"]))
    emit(pairs=pairs)


async def send_stream(layer, spec, commands):
    """Send ``count`` numbered messages round-robin to the channels.

    A send that finds its channel full is retried (backpressure) until
    ``full_deadline`` seconds have passed.  With ``crash_after``, the send
    after that many kills this process while it holds the segment lock.
    """
    targets = spec["channels"]
    if spec.get("wait_for_go"):
        await commands.next()
    crash_after = spec.get("crash_after")
    report_every = spec.get("report_every", 0)
    for i in range(spec["count"]):
        if crash_after is not None and i == crash_after:
            lib.dmb_test_crash_at(spec.get("crash_point", 1), 1)
        message = {"type": "m", "src": spec["tag"], "id": i}
        channel = targets[i % len(targets)]
        deadline = time.monotonic() + spec.get("full_deadline", 10)
        while True:
            try:
                await layer.send(channel, message)
                break
            except ChannelFull:
                if time.monotonic() > deadline:
                    emit(full=channel, id=i)
                    raise
                await asyncio.sleep(0.002)
        if report_every and i % report_every == 0:
            emit(sent=i)
        if spec.get("pace"):
            await asyncio.sleep(spec["pace"])
    emit(done=spec["count"])


async def join(layer, spec, commands):
    """Join a group with new specific channels; report what each receives."""
    names = [await layer.new_channel() for _ in range(spec["channels"])]
    for name in names:
        await layer.group_add(spec["group"], name)
    emit(channels=names)
    got = {}
    for name in names:
        got[name] = []
        for _ in range(spec["expect"]):
            message = await asyncio.wait_for(layer.receive(name), spec["timeout"])
            got[name].append(message)
    emit(messages=got)


ACTIONS = {
    "idle": idle,
    "wait_receive": wait_receive,
    "send": send,
    "try_receive": try_receive,
    "drain": drain,
    "drain_pairs": drain_pairs,
    "send_stream": send_stream,
    "join": join,
}


async def run_action(spec):
    commands = Commands()
    await commands.open()
    layer = SharedMemoryChannelLayer(**spec["config"])
    try:
        await ACTIONS[spec["action"]](layer, spec, commands)
    finally:
        await layer.close()


def my_slot(layer):
    """(slot, client) as the segment records them for this process."""
    from dmb_tools import slots

    for slot in slots(layer.segment_name):
        if slot["pid"] == os.getpid():
            return slot
    return None


def fork(spec):
    """Build a layer, fork, and have parent and child each use their own.

    Runs without an event loop around the fork, as a pre-forking server
    does; both sides then receive on their own specific channels.
    """
    layer = SharedMemoryChannelLayer(**spec["config"])
    parent_channel = asyncio.run(layer.new_channel())
    before = my_slot(layer)
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(to_parent_r)
            os.close(to_child_w)
            report = asyncio.run(forked_child(layer, parent_channel, to_parent_w))
            with os.fdopen(to_parent_w, "w") as out:
                out.write(json.dumps(report) + "\n")
            code = 0
        finally:
            os._exit(code)
    os.close(to_parent_w)
    os.close(to_child_r)
    with os.fdopen(to_parent_r) as inbox:
        child_channel = inbox.readline().strip()
        parent_got = asyncio.run(
            forked_parent(layer, parent_channel, child_channel, spec["timeout"])
        )
        child_report = json.loads(inbox.readline())
    _, status = os.waitpid(pid, 0)
    emit(
        parent_pid=os.getpid(),
        child_pid=pid,
        child_status=status,
        before=before,
        parent_channel=parent_channel,
        parent_got=parent_got,
        parent_after=my_slot(layer),
        child=child_report,
    )
    asyncio.run(layer.close())


async def forked_child(layer, parent_channel, out_fd):
    channel = await layer.new_channel()
    os.write(out_fd, (channel + "\n").encode())
    slot = my_slot(layer)
    await layer.send(parent_channel, {"type": "from.child", "pid": os.getpid()})
    got = await asyncio.wait_for(layer.receive(channel), 10)
    try:
        await layer.receive(parent_channel)
        foreign = None
    except Exception as exc:  # judged by the test
        foreign = type(exc).__name__
    await layer.close()
    return {"channel": channel, "slot": slot, "got": got, "foreign": foreign}


async def forked_parent(layer, parent_channel, child_channel, timeout):
    await layer.send(child_channel, {"type": "from.parent", "pid": os.getpid()})
    return await asyncio.wait_for(layer.receive(parent_channel), timeout)


def main():
    spec = json.loads(sys.argv[1])
    if spec["action"] == "fork":
        fork(spec)
    else:
        asyncio.run(run_action(spec))


if __name__ == "__main__":
    main()
