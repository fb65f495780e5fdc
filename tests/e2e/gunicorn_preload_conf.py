"""gunicorn settings for the --preload test: use the layer before forking.

With --preload the application is imported once in the arbiter and the
workers are forked from it. This hook makes the arbiter also build the
channel layer and do a round trip through it before the first fork, the
way a site does when some import-time code sends a message. Each worker
then starts with a copy of a layer that is already attached, and must
still work as a process of its own.
"""

import os


def when_ready(server):
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    layer = get_channel_layer()

    async def round_trip():
        name = await layer.new_channel()
        await layer.send(name, {"type": "preload.check"})
        return await layer.receive(name)

    message = async_to_sync(round_trip)()
    if message.get("type") != "preload.check":
        raise RuntimeError(f"unexpected message in the arbiter: {message!r}")
    server.log.info("preload: layer round trip in arbiter pid %s ok", os.getpid())
