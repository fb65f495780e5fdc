"""The Celery app that celery_bench.py's workers run.

Broker and result backend come from the environment (BENCH_BROKER,
BENCH_BACKEND), so one module serves dmb and Redis alike.
"""

import os

from celery import Celery

import dmb.kombu

app = Celery(
    "bench",
    broker=os.environ.get("BENCH_BROKER", "dmb://bench"),
    backend=os.environ.get("BENCH_BACKEND", "rpc://"),
)
app.conf.broker_connection_retry_on_startup = True
app.conf.worker_hijack_root_logger = False


@app.task(name="bench.echo")
def echo(value):
    return value
