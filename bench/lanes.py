"""How long an interactive job waits behind a deep batch lane.

With ``--backlog`` (1000) ``batch`` jobs queued on one worker, 50
``interactive`` jobs are submitted one at a time (each after the previous
ended, plus a random pause so arrivals fall anywhere within a running
job). Each one's wait before start (``started_at - created_at``, both
stamped by the service) is reported in units of the mean job duration
(``finished_at - started_at``) measured in the same run. With strict lanes
an interactive job waits at most for the job already running: p99 ≤ 1.2.
"""
from __future__ import annotations

import json
import random
import threading
import time
from datetime import datetime

import requests

from bench.common import Options, ServiceStack, load_images, percentile

BACKLOG = 1000
PROBES = 50


def _seconds(job: dict, start: str, end: str) -> float:
    return (datetime.fromisoformat(job[end]) - datetime.fromisoformat(job[start])).total_seconds()


def _submit(session: requests.Session, stack: ServiceStack, name: str, data: bytes, lane: str) -> dict:
    files = {"image": (name, data), "request": (None, json.dumps({"lane": lane}), "application/json")}
    answer = session.post(f"{stack.base_url}/v1/jobs", files=files, timeout=60)
    answer.raise_for_status()
    return answer.json()


def run(options: Options) -> list[dict]:
    images = load_images(options.images)
    rng = random.Random(7)
    # The result cache would answer repeated images without running them: measure real jobs.
    with ServiceStack(overrides={"result_cache_enabled": False}) as stack:
        # Fill the batch lane from a few threads; the worker starts on it at once.
        counter = iter(range(BACKLOG))
        lock = threading.Lock()

        def fill():
            with requests.Session() as session:
                session.headers.update(stack.headers)
                while True:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    name, data = images[i % len(images)]
                    _submit(session, stack, name, data, "batch")

        fillers = [threading.Thread(target=fill) for _ in range(4)]
        for thread in fillers:
            thread.start()
        for thread in fillers:
            thread.join()

        waits, durations = [], []
        with requests.Session() as session:
            session.headers.update(stack.headers)
            depth_at_start = session.get(f"{stack.base_url}/metrics").text
            for i in range(PROBES):
                time.sleep(rng.uniform(0, 0.5))
                name, data = images[i % len(images)]
                job = _submit(session, stack, name, data, "interactive")
                while job["status"] in ("queued", "running"):
                    job = session.get(f"{stack.base_url}/v1/jobs/{job['id']}", params={"wait": 30}, timeout=60).json()
                waits.append(_seconds(job, "created_at", "started_at"))
                durations.append(_seconds(job, "started_at", "finished_at"))
            # The batch jobs that ran meanwhile count toward the mean job duration too.
            metrics = session.get(f"{stack.base_url}/metrics").text
        batch_left = _lane_depth(metrics, "batch")
        mean = _mean_duration(stack, durations)
    return [{
        "case": f"{PROBES} interactive behind {BACKLOG} batch",
        "batch_left": batch_left,
        "batch_at_first_probe": _lane_depth(depth_at_start, "batch"),
        "mean_job_s": round(mean, 3),
        "wait_p50_s": round(percentile(waits, 50), 3),
        "wait_p99_s": round(percentile(waits, 99), 3),
        "wait_p50_jobs": round(percentile(waits, 50) / mean, 2),
        "wait_p99_jobs": round(percentile(waits, 99) / mean, 2),
    }]


def _lane_depth(metrics: str, lane: str) -> int:
    for line in metrics.splitlines():
        if line.startswith(f'maskq_lane_depth{{lane="{lane}"}}'):
            return int(float(line.split()[-1]))
    return -1


def _mean_duration(stack: ServiceStack, probe_durations: list[float]) -> float:
    """Mean run time of the last 50 jobs the worker finished in this run (as the service estimates it)."""
    import redis

    from tasks.records import JobStore

    jobs = JobStore(redis.Redis.from_url(stack.redis.url), 3600)
    return jobs.mean_duration(default=sum(probe_durations) / len(probe_durations))


def summary(rows: list[dict]) -> list[str]:
    return [f"lane_wait_p99_in_jobs={rows[0]['wait_p99_jobs']}"]
