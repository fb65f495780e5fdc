"""Channels' test tools on dmb.

ChannelsLiveServerTestCase: the server runs in another process, and the
test process and the server meet through the layer.  WebsocketCommunicator:
the consumer runs in the test's loop, and hears a process started beside it.
"""

import asyncio
import json
import os
import sys

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.testing import ChannelsLiveServerTestCase, WebsocketCommunicator
from django.test import SimpleTestCase
from websockets.sync.client import connect

from liveproject.asgi import application

WAIT = float(os.environ.get("LIVEPROJECT_WAIT", "15"))


class LiveServerOnDmb(ChannelsLiveServerTestCase):
    serve_static = False

    def connect(self):
        websocket = connect(self.live_server_ws_url + "/ws/room/", open_timeout=WAIT)
        hello = json.loads(websocket.recv(timeout=WAIT))
        self.assertNotEqual(hello["pid"], os.getpid())  # another process
        return websocket, hello["pid"]

    def test_group_send_from_the_test_reaches_the_live_server(self):
        websocket, server = self.connect()
        with websocket:
            async_to_sync(get_channel_layer().group_send)(
                "room", {"type": "room.message", "text": "from the test"}
            )
            got = json.loads(websocket.recv(timeout=WAIT))
        self.assertEqual(got, {"text": "from the test", "pid": server})

    def test_a_message_from_the_browser_reaches_the_test(self):
        websocket, server = self.connect()
        with websocket:
            websocket.send("to the test")

            async def take():
                return await asyncio.wait_for(
                    get_channel_layer().receive("inbox"), WAIT
                )

            got = async_to_sync(take)()
        self.assertEqual(
            got, {"type": "inbox.message", "text": "to the test", "pid": server}
        )

    def test_the_run_has_a_segment_of_its_own(self):
        layer = get_channel_layer()
        self.assertTrue(layer.prefix.startswith(f"liveproject-test-{os.getpid()}-"))
        self.assertEqual(layer.size, 4 * 1024 * 1024)


#: Another process, on the same segment, sends to the group "room".
GROUP_SENDER = """
import sys
from dmb import SharedMemoryChannelLayer
layer = SharedMemoryChannelLayer(prefix=sys.argv[1], size=int(sys.argv[2]))
layer.group_send_sync("room", {"type": "room.message", "text": sys.argv[3]})
layer.close_sync()
"""


class CommunicatorOnDmb(SimpleTestCase):
    async def test_a_consumer_under_test_hears_another_process(self):
        communicator = WebsocketCommunicator(application, "/ws/room/")
        connected, _ = await communicator.connect(timeout=WAIT)
        self.assertTrue(connected)
        hello = await communicator.receive_json_from(timeout=WAIT)
        self.assertEqual(hello["pid"], os.getpid())  # the consumer runs here
        layer = get_channel_layer()
        sender = await asyncio.create_subprocess_exec(
            sys.executable, "-c", GROUP_SENDER, layer.prefix, str(layer.size),
            "from another process",
        )
        self.assertEqual(await asyncio.wait_for(sender.wait(), WAIT), 0)
        got = await communicator.receive_json_from(timeout=WAIT)
        self.assertEqual(got, {"text": "from another process", "pid": os.getpid()})
        await communicator.disconnect()
