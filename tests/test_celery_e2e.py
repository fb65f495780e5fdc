"""Celery over dmb, end to end: real ``celery worker`` (prefork) and
``celery beat`` processes running the example in examples/celery.

Each test has its own segment and results directory; every process it
starts is stopped (its whole process group) and the segment removed
after it.  All traffic is to 127.0.0.1.
"""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("celery")

from dmb.segment import segment_name, unlink_segment  # noqa: E402

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "celery"
BIN = Path(sys.executable).parent
READY = re.compile(r"\S+@\S+ ready\.")


class Process:
    """A process in its own session, its output in a file."""

    def __init__(self, name, argv, env, log_dir):
        self.name = name
        self.log = log_dir / f"{name}.log"
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(
                argv,
                cwd=EXAMPLE,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self):
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.output()):
                return
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name} never printed {pattern!r}:\n{self.output()}")

    def kill(self, sig=signal.SIGKILL):
        """Signal the whole process group (a worker and its pool)."""
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self):
        if self.popen.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                pass
        self.kill(signal.SIGKILL)  # the pool, if its parent left it behind
        self.popen.wait(5)

    def cpu_seconds(self):
        """User + system time of the process and its pool children."""
        total = 0
        for pid in [self.popen.pid, *_children(self.popen.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
            except OSError:
                continue
            utime, stime = fields.split()[11:13]
            total += int(utime) + int(stime)
        return total / os.sysconf("SC_CLK_TCK")


def _children(pid):
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class Site:
    """The example site of one test: its environment and its processes."""

    def __init__(self, prefix, tmp_path):
        self.prefix = prefix
        self.tmp = tmp_path
        self.results = tmp_path / "results"
        self.results.mkdir()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(EXAMPLE),
            "DJANGO_SETTINGS_MODULE": "jobsite.settings",
            "DMB_PREFIX": prefix,
            "JOBS_RESULTS_DIR": str(self.results),
            "JOBS_STEP_SECONDS": "0.3",
            "CELERY_BROKER_URL": f"dmb://{prefix}?size=8388608&recover_interval=0.5",
        }
        self.processes = []

    def start(self, name, argv, **env):
        process = Process(name, argv, {**self.env, **env}, self.tmp)
        self.processes.append(process)
        return process

    def worker(self, name="w", concurrency=2, **env):
        worker = self.start(
            name,
            [
                BIN / "celery",
                "-A",
                "jobsite",
                "worker",
                "-P",
                "prefork",
                "-c",
                str(concurrency),
                "-n",
                f"{name}@%h",
                "-l",
                "info",
                "--without-mingle",
                "--without-gossip",
            ],
            **env,
        )
        worker.wait_for(READY)
        return worker

    def submit(self, code, **env):
        """Run Python in a process of the site (Django set up); its stdout."""
        script = "import django; django.setup()\n" + code
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=EXAMPLE,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def result(self, task_id):
        """The file result backend's record of a task, or None."""
        path = self.results / f"celery-task-meta-{task_id}"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def wait_result(self, task_id, status, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.result(task_id)
            if found and found["status"] == status:
                return found
            time.sleep(0.05)
        raise AssertionError(f"task {task_id} never reached {status}: {found}")

    def close(self):
        for process in reversed(self.processes):
            process.stop()


@pytest.fixture
def site(prefix, tmp_path):
    site = Site(prefix, tmp_path)
    yield site
    site.close()
    unlink_segment(segment_name(prefix))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_view_starts_a_job_whose_progress_reaches_the_browser(site):
    worker = site.worker()
    port = free_port()
    server = site.start(
        "uvicorn",
        [BIN / "uvicorn", "jobsite.asgi:application", "--port", str(port)],
    )
    server.wait_for(r"Uvicorn running")
    base = f"http://127.0.0.1:{port}"

    request = urllib.request.Request(f"{base}/jobs/", data=b"steps=3", method="POST")
    job = json.load(urllib.request.urlopen(request, timeout=10))
    events = asyncio.run(_follow(f"ws://127.0.0.1:{port}/ws/jobs/{job['id']}/"))

    progress = [e["done"] for e in events if e["type"] == "progress"]
    assert progress and progress == sorted(progress) and progress[-1] == 3
    assert events[-1]["type"] == "done"
    state = json.load(urllib.request.urlopen(f"{base}/jobs/{job['id']}/", timeout=10))
    assert state["state"] == "SUCCESS"
    assert state["result"]["steps"] == 3
    assert state["result"] == events[-1]["result"]

    # Idle, the worker and its pool sleep on their FIFOs: what CPU they use
    # is Celery's own timers.
    before = worker.cpu_seconds()
    time.sleep(3)
    assert worker.cpu_seconds() - before < 0.3


async def _follow(address):
    from websockets.asyncio.client import connect

    events = []
    async with connect(address) as ws:
        while not events or events[-1]["type"] != "done":
            events.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
            if events[-1].get("state") == "SUCCESS":
                break
    return events


def test_a_job_of_a_killed_worker_is_finished_by_another(site):
    first, second = site.worker("first"), site.worker("second")
    workers = {"first": first, "second": second}
    job_id = site.submit("from jobs.tasks import count\nprint(count.delay(8).id)")

    started = site.wait_result(job_id, "STARTED")
    victim = started["result"]["hostname"].split("@")[0]
    survivor = "second" if victim == "first" else "first"
    time.sleep(0.5)  # well inside the job: 8 steps of 0.3 s
    workers[victim].kill(signal.SIGKILL)
    workers[victim].popen.wait(10)

    done = site.wait_result(job_id, "SUCCESS", timeout=40)
    assert done["result"]["worker"].startswith(f"{survivor}@")
    assert done["result"]["steps"] == 8
    assert "Task jobs.tasks.count" in workers[survivor].output()


def test_beat_schedules_tasks_that_workers_run(site):
    site.worker(JOBS_BEAT_SECONDS="0.5")
    beat = site.start(
        "beat",
        [BIN / "celery", "-A", "jobsite", "beat", "-l", "info"],
        JOBS_BEAT_SECONDS="0.5",
    )
    ticks = site.results / "ticks"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if ticks.exists() and len(ticks.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    assert ticks.exists(), beat.output()
    assert len(ticks.read_text().splitlines()) >= 3


def test_rpc_results_and_remote_control_go_through_the_segment(site):
    site.worker(CELERY_RESULT_BACKEND="rpc://")
    answer = site.submit(
        "from jobs.tasks import count\n"
        "print(count.delay(1).get(timeout=20)['steps'])\n"
        "from jobsite.celery import app\n"
        "print(sorted(app.control.inspect(timeout=10, limit=1).ping()))",
        CELERY_RESULT_BACKEND="rpc://",
        JOBS_STEP_SECONDS="0.01",
    )
    assert answer.splitlines() == ["1", f"['w@{socket.gethostname()}']"]


def test_celery_sees_the_queues_in_the_segment(site):
    site.submit(
        "from jobs.tasks import count\n"
        "for n in range(3):\n    count.delay(1)\n"
        "from jobsite.celery import app\n"
        "with app.connection_for_read() as conn:\n"
        "    with conn.channel() as channel:\n"
        "        print(channel.queue_declare('celery', passive=True).message_count)"
    )
    inspect = site.submit(
        "import json\nfrom dmb.kombu import queue_summary\n"
        "from dmb.segment import Segment, segment_name\n"
        "import os\n"
        "s = Segment(segment_name(os.environ['DMB_PREFIX']), create=False)\n"
        "print(json.dumps(queue_summary(s)))"
    )
    [celery] = [q for q in json.loads(inspect) if q["queue"] == "celery"]
    assert celery["ready"] == 3 and celery["unacked"] == 0
