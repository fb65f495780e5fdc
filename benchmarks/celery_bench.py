"""Celery over dmb beside Celery over Redis, in one run.

    .venv/bin/python -m benchmarks.celery_bench            # ~1 minute
    .venv/bin/python -m benchmarks.celery_bench --tasks 500 --latency 100

For each broker it starts a real ``celery worker`` (prefork pool,
concurrency 2, Celery's defaults otherwise) and measures from this
process, which submits:

* throughput: ``--tasks`` tasks submitted at once, divided by the time from
  the first submission to the last result;
* latency: ``--latency`` tasks one at a time, submit to result in hand
  (median, p95, p99).

Brokers: dmb (``dmb://``) and a private redis-server started here on
127.0.0.1 (a free port, no persistence, stopped at the end).  Results come
back through the broker itself (``rpc://``) in both, so the comparison is
of brokers alone; Redis is also run with its own result backend
(``redis://``), the usual Redis set-up.  The report gives dmb's figures as
ratios of Redis's.  ``--json PATH`` writes them too.
"""

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import celery
from celery import Celery

import dmb.kombu

from .harness import RedisServer

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"\S+@\S+ ready\.")


class Worker:
    """``celery worker`` for the bench app, in a session of its own."""

    def __init__(self, broker, backend, log):
        env = {**os.environ, "BENCH_BROKER": broker, "BENCH_BACKEND": backend}
        self.log = log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "benchmarks.celery_tasks",
                    "worker",
                    "-P",
                    "prefork",
                    "-c",
                    "2",
                    "-l",
                    "info",
                    "-n",
                    f"bench-{uuid.uuid4().hex[:6]}@%h",
                    "--without-mingle",
                    "--without-gossip",
                    "--without-heartbeat",
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while not READY.search(Path(log).read_text(errors="replace")):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start; see {log}")
            time.sleep(0.05)

    def stop(self):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                continue


def measure(name, broker, backend, tasks, latency, log_dir):
    app = Celery("bench-client", broker=broker, backend=backend)
    app.conf.broker_connection_retry_on_startup = True
    worker = Worker(broker, backend, log_dir / f"{name}.log")
    try:
        for _ in range(20):  # warm up: connections, pools, imports
            app.send_task("bench.echo", args=[0]).get(timeout=30)
        times = []
        for n in range(latency):
            start = time.perf_counter()
            app.send_task("bench.echo", args=[n]).get(timeout=30)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        pending = [app.send_task("bench.echo", args=[n]) for n in range(tasks)]
        submitted = time.perf_counter() - start
        for result in pending:
            result.get(timeout=120)
        elapsed = time.perf_counter() - start
    finally:
        worker.stop()
        app.close()
    times.sort()
    return {
        "broker": name,
        "backend": backend.split(":")[0],
        "tasks_per_second": tasks / elapsed,
        "submits_per_second": tasks / submitted,
        "latency_ms": {
            "median": statistics.median(times) * 1000,
            "p95": times[int(len(times) * 0.95) - 1] * 1000,
            "p99": times[int(len(times) * 0.99) - 1] * 1000,
        },
    }


def report(rows):
    lines = [
        "| broker | results | tasks/s | submits/s | latency median ms | p95 | p99 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['broker']} | {r['backend']} | {r['tasks_per_second']:.0f} | "
            f"{r['submits_per_second']:.0f} | {lat['median']:.2f} | "
            f"{lat['p95']:.2f} | {lat['p99']:.2f} |"
        )
    dmb = rows[0]
    lines.append("")
    for other in rows[1:]:
        tput = dmb["tasks_per_second"] / other["tasks_per_second"]
        lat = other["latency_ms"]["median"] / dmb["latency_ms"]["median"]
        lines.append(
            f"dmb vs {other['broker']} ({other['backend']} results): "
            f"throughput x{tput:.2f}, median latency {lat:.2f}x lower"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--latency", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    log_dir = ROOT / "benchmarks" / "results" / "celery-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"cbench{os.getpid()}"
    redis = RedisServer()
    rows = []
    try:
        redis_url = f"redis://127.0.0.1:{redis.port}/0"
        configs = [
            ("dmb", f"dmb://{prefix}?size=67108864", "rpc://"),
            ("redis", redis_url, "rpc://"),
            ("redis", redis_url, f"redis://127.0.0.1:{redis.port}/1"),
        ]
        for name, broker, backend in configs:
            rows.append(
                measure(name, broker, backend, args.tasks, args.latency, log_dir)
            )
            print(f"measured {name} with {backend.split(':')[0]} results", flush=True)
    finally:
        redis.stop()
        from dmb.segment import segment_name, unlink_segment

        unlink_segment(segment_name(prefix))
    print()
    print(
        f"Celery {celery.__version__}, redis-server {redis.version}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"{args.tasks} tasks, {args.latency} latency samples"
    )
    print(report(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
