"""The FIFO reader a finished receive leaves in its event loop.

A receive that waited leaves its FIFO registered with the loop (count 0)
so the next receive there reuses the registration.  It must still never
outlive its use: it goes when the FIFO rings with nobody waiting in that
loop, and when the slot is given back (close), without leaving a loop
watching a closed descriptor.
"""

import asyncio
import os

import pytest

TEST_SIZE = 4 * 1024 * 1024


def registered(loop, fd):
    try:
        loop._selector.get_key(fd)
    except (KeyError, ValueError):
        return False
    return True


async def receive_after_a_wait(layer, channel):
    """A receive that has to wait, then gets a message sent to it."""
    task = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0.01)
    await layer.send(channel, {"type": "m"})
    return await asyncio.wait_for(task, 5)


async def test_next_receive_reuses_the_reader(make_layer, monkeypatch):
    layer = make_layer(size=TEST_SIZE)
    loop = asyncio.get_running_loop()
    channel = await layer.new_channel()
    adds = []
    add_reader = loop.add_reader
    monkeypatch.setattr(
        loop, "add_reader", lambda *a: adds.append(a[0]) or add_reader(*a)
    )
    for _ in range(5):
        assert await receive_after_a_wait(layer, channel) == {"type": "m"}
    assert adds == [layer._doorbell.fd]
    assert registered(loop, layer._doorbell.fd)


async def test_reader_goes_when_it_rings_with_nobody_waiting(make_layer):
    layer = make_layer(size=TEST_SIZE)
    other = make_layer(size=TEST_SIZE)
    loop = asyncio.get_running_loop()
    channel = await layer.new_channel()
    await receive_after_a_wait(layer, channel)
    fd = layer._doorbell.fd
    assert registered(loop, fd)
    # Nothing waits now; a ring (here a stray one) takes the reader out.
    other._ringer.ring(layer._token, 0)
    for _ in range(100):
        if not registered(loop, fd):
            break
        await asyncio.sleep(0.01)
    assert not registered(loop, fd)
    assert loop not in layer._doorbell.loops
    # And waiting works as before afterwards.
    assert await receive_after_a_wait(layer, channel) == {"type": "m"}


async def test_close_takes_the_reader_out_and_closes_the_fifo(make_layer):
    layer = make_layer(size=TEST_SIZE)
    loop = asyncio.get_running_loop()
    channel = await layer.new_channel()
    await receive_after_a_wait(layer, channel)
    bell = layer._doorbell
    fd, path = bell.fd, bell.path
    assert registered(loop, fd)
    await layer.close()
    assert not registered(loop, fd)
    assert bell.fd is None
    assert not os.path.exists(path)
    # The layer attaches again on use and receives as before.
    channel = await layer.new_channel()
    assert await receive_after_a_wait(layer, channel) == {"type": "m"}


@pytest.mark.timeout(60)
def test_many_short_loops_leave_nothing_behind(make_layer):
    """asyncio.run per call (as async_to_sync does): no loop is kept."""
    layer = make_layer(size=TEST_SIZE)
    for i in range(20):
        channel = f"bench.reuse.{i}"

        async def once(channel=channel):
            return await receive_after_a_wait(layer, channel)

        assert asyncio.run(once()) == {"type": "m"}
    # Each loop closed with its selector; the doorbell forgets them as new
    # loops watch, so at most the last one is still listed.
    assert len(layer._doorbell.loops) <= 1
