"""A second process for the conformance suite.

The test that starts it passes one JSON argument: the backend, the layer's
configuration (the same as the test's own layer, so both meet in the same
namespace) and an action. Every result is printed as one JSON line.
"""

import asyncio
import json
import sys


def build_layer(backend, config):
    if backend == "dmb":
        import dmb

        return dmb.SharedMemoryChannelLayer(**config)
    if backend == "redis":
        from channels_redis.core import RedisChannelLayer

        return RedisChannelLayer(**config)
    if backend == "redis_pubsub":
        from channels_redis.pubsub import RedisPubSubChannelLayer

        return RedisPubSubChannelLayer(**config)
    raise SystemExit(f"peer: backend {backend!r} cannot run in another process")


def emit(result):
    print(json.dumps(result), flush=True)


async def wait_for_stdin_to_close():
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def release(backend, layer):
    if backend == "dmb":
        await layer.close()
    elif backend == "redis":
        await layer.close_pools()
    else:
        await layer.flush()


async def act(layer, spec):
    action = spec["action"]
    if action == "new_channel":
        # Hold a specific channel of this process until told to stop.
        emit({"channel": await layer.new_channel()})
        await wait_for_stdin_to_close()
    elif action == "send":
        for message in spec["messages"]:
            await layer.send(spec["channel"], message)
        emit({"sent": len(spec["messages"])})
    elif action == "drain":
        # Say when ready, wait for a line on stdin, then receive from a
        # channel until it stays quiet for `idle` seconds.
        emit({"ready": True})
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        messages = []
        while True:
            try:
                message = await asyncio.wait_for(
                    layer.receive(spec["channel"]), spec["idle"]
                )
            except asyncio.TimeoutError:
                break
            messages.append(message)
        emit({"messages": messages})
    elif action == "join":
        # Join a group with a channel of this process, then report what
        # arrives on it.
        channel = await layer.new_channel()
        await layer.group_add(spec["group"], channel)
        emit({"channel": channel})
        try:
            message = await asyncio.wait_for(layer.receive(channel), spec["timeout"])
        except asyncio.TimeoutError:
            message = None
        emit({"message": message})
    else:
        raise SystemExit(f"peer: unknown action {action!r}")


async def main(spec):
    layer = build_layer(spec["backend"], spec["config"])
    try:
        await act(layer, spec)
    finally:
        await release(spec["backend"], layer)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
