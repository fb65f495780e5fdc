"""Channels' test tools on dmb, run as a user runs them.

``python -m django test`` runs tests/liveserver/liveproject/tests.py: a
ChannelsLiveServerTestCase (a live Daphne server in another process,
websockets from the test process, messages both ways through the layer)
and a WebsocketCommunicator test that hears another process.  dmb's test
runner gives the run a segment of its own and removes it; the site's own
segment is never made.  The same run on InMemoryChannelLayer fails, which
is why the case exists.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dmb.segment import segment_name, segment_path

PROJECT = Path(__file__).parent / "liveserver"
SHM = Path(segment_path(segment_name("liveproject"))).parent


def run_django_tests(tmp_path, **env):
    result = subprocess.run(
        [sys.executable, "-m", "django", "test", "liveproject", "-v", "2"],
        cwd=PROJECT,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "liveproject.settings",
            "LIVEPROJECT_DB_DIR": str(tmp_path),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=150,
    )
    return result.returncode, result.stdout + result.stderr


def our_segments():
    return {p.name for p in SHM.iterdir() if p.name.startswith("dmb-")
            and "liveproject" in p.name}


@pytest.mark.timeout(180)
def test_channels_live_server_test_case_runs_on_dmb(tmp_path):
    before = our_segments()
    code, output = run_django_tests(tmp_path)
    assert code == 0, output
    assert "Ran 4 tests" in output and "\nOK" in output, output
    for name in (
        "test_group_send_from_the_test_reaches_the_live_server",
        "test_a_message_from_the_browser_reaches_the_test",
        "test_the_run_has_a_segment_of_its_own",
        "test_a_consumer_under_test_hears_another_process",
    ):
        assert re.search(rf"^{name} .* \.\.\. ok$", output, re.MULTILINE), output
    # The run's segment and wake-up FIFOs are gone; the site's was never made.
    assert our_segments() == before
    assert not os.path.exists(segment_path(segment_name("liveproject")))


@pytest.mark.timeout(180)
def test_the_same_tests_fail_on_a_layer_that_stays_in_one_process(tmp_path):
    code, output = run_django_tests(
        tmp_path,
        LIVEPROJECT_BACKEND="channels.layers.InMemoryChannelLayer",
        LIVEPROJECT_WAIT="3",
    )
    assert code != 0
    assert re.search(
        r"^test_group_send_from_the_test_reaches_the_live_server .* \.\.\. ERROR$",
        output,
        re.MULTILINE,
    ), output
    assert "TimeoutError" in output
