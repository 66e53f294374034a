"""Celery baseline: a no-op task on RabbitMQ (amqp) with the rpc:// result backend.

The worker is started by bench/e2e_tasks.py as
``celery -A bench.celery_app worker --pool=prefork -c 2 --loglevel=WARNING -Q <queue>``.
The queue name comes from BENCH_CELERY_QUEUE so that a run never shares its queue with another
Celery user of the same broker; the benchmark deletes it afterwards.
"""

from __future__ import annotations

import os

from celery import Celery

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "bench-celery")

app = Celery("bench", broker=BROKER_URL, backend="rpc://")
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop() -> None:
    return None
