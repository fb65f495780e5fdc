"""The demo driver itself: it must keep working, and say so by its exit code."""

import re
import subprocess

import pytest

from . import helpers

pytestmark = pytest.mark.e2e

DEMO = helpers.CHAT_DIR / "demo.py"


@pytest.mark.timeout(150)
def test_demo_delivers_everything(e2e_prefix):
    """A small run of examples/chat/demo.py exits 0 and reports no loss."""
    argv = [
        helpers.PYTHON,
        str(DEMO),
        "--clients",
        "12",
        "--messages",
        "3",
        "--interval",
        "0.2",
        "--job-steps",
        "2",
        "--prefix",
        e2e_prefix,
    ]
    proc = subprocess.Popen(
        argv,
        cwd=helpers.REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # The demo bounds all its own waits; this only guards against the
        # demo itself hanging.
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the demo then stops the servers it started.
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"the demo did not finish in time\n{out}")
    assert proc.returncode == 0, out
    assert "result: OK" in out, out

    # The demo may connect more clients than asked, to reach every worker.
    clients = int(re.search(r"^clients: (\d+)$", out, re.MULTILINE).group(1))
    assert clients >= 12, out
    for label, expected in (
        ("chat messages", clients * clients * 3),
        ("announcements", clients),
        ("job progress", clients * 2),
    ):
        assert f"{label} delivered: {expected}/{expected}" in out, out
