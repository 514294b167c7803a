"""How long an interactive job waits behind a deep batch lane.

With 1000 ``batch`` jobs queued on one worker (queued while its resource
gate is held shut, then released), 50
``interactive`` jobs are submitted one at a time (each after the previous
ended, plus a random pause so arrivals fall anywhere within a running
job). Each one's wait before start (``started_at - created_at``, both
stamped by the service) is reported in units of the mean job duration
(the mean of the last 50 jobs' ``finished_at - started_at``, as the service
keeps it) measured in the same run. With strict lanes an interactive job
waits at most for the job already running: p99 ≤ 1.2. A second case turns
aging on (5 s): then one promoted batch job at a time may sit in the
interactive lane, so the bound becomes the running job plus one.

Jobs of different images last very differently (``en.jpg`` about 2.5x the
mean), so besides the issue's measure on a backlog of one image, two exact
ones: ``overtaken`` (lower-lane jobs that started while an interactive job
waited: 0) and each wait in units of the job running when it arrived.
"""

from __future__ import annotations

import functools
import json
import random
import threading
import time
from datetime import datetime

import redis
import requests

from bench.common import Options, ServiceStack, load_images, percentile
from models.catalog import ModelCatalog
from stores.jobs import JobStore

BACKLOG = 1000
PROBES = 50
AGING_S = 5


def _seconds(job: dict, start: str, end: str) -> float:
    return (datetime.fromisoformat(job[end]) - datetime.fromisoformat(job[start])).total_seconds()


def _default_model(stack: ServiceStack) -> str:
    return _manifest_default(stack.settings.models_manifest)


@functools.cache
def _manifest_default(manifest) -> str:
    return ModelCatalog.load(manifest).default


def _submit(session: requests.Session, stack: ServiceStack, name: str, data: bytes, lane: str) -> dict:
    # The manifest's default model, named: a job without prompts or model would be routed to SAM's
    # segment-everything (seconds a job), which is not what this measures.
    request = {"lane": lane, "model": _default_model(stack)}
    files: dict[str, tuple[str | None, bytes | str] | tuple[str | None, bytes | str, str]] = {
        "image": (name, data),
        "request": (None, json.dumps(request), "application/json"),
    }
    answer = session.post(f"{stack.base_url}/v1/jobs", files=files, timeout=60)
    answer.raise_for_status()
    return answer.json()


def run(options: Options) -> list[dict]:
    images = load_images(options.images)
    one = [image for image in images if image[0] == "ch_en_num.jpg"] or images[:1]
    return [
        # Jobs of one image last about the same: "units of the mean job" then means what it says.
        _measure(one, "strict lanes, one image", lane_aging_s=0),
        _measure(images, "strict lanes, five images", lane_aging_s=0),
        # Aging on, with an age short enough to act within the run: the price of batch never starving.
        _measure(images, f"five images, aging after {AGING_S:g} s", lane_aging_s=AGING_S),
    ]


def _measure(images, case: str, **overrides) -> dict:
    rng = random.Random(7)
    # The result cache would answer repeated images without running them: measure real jobs.
    # The gate's reserve starts out of reach, so the worker takes nothing while the lane fills.
    with ServiceStack(overrides={"result_cache_enabled": False, "gate_reserve_mb": 10**9, **overrides}) as stack:
        client = redis.Redis.from_url(stack.redis_url)
        counter = iter(range(BACKLOG))
        lock = threading.Lock()
        batch_ids: list[str] = []

        def fill():
            with requests.Session() as session:
                session.headers.update(stack.headers)
                while True:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    name, data = images[i % len(images)]
                    job_id = _submit(session, stack, name, data, "batch")["id"]
                    with lock:
                        batch_ids.append(job_id)

        fillers = [threading.Thread(target=fill) for _ in range(4)]
        for thread in fillers:
            thread.start()
        for thread in fillers:
            thread.join()
        client.set("maskq:gate:reserve_mb", 0)  # open the gate: the worker starts on the backlog

        waits, probes = [], []  # probes: (job id, when its POST returned: the job was in the broker by then)
        with requests.Session() as session:
            session.headers.update(stack.headers)
            for i in range(PROBES):
                time.sleep(rng.uniform(0, 0.5))
                name, data = images[i % len(images)]
                job = _submit(session, stack, name, data, "interactive")
                posted_at = time.time()  # the same clock as the service's stamps: this machine's
                while job["status"] in ("queued", "running"):
                    job = session.get(f"{stack.base_url}/v1/jobs/{job['id']}", params={"wait": 30}, timeout=60).json()
                waits.append(_seconds(job, "created_at", "started_at"))
                probes.append((job["id"], posted_at))
            metrics = session.get(f"{stack.base_url}/metrics").text
        jobs = JobStore(client, 3600)
        mean = jobs.mean_duration()
        overtaken, in_running = _against_running(jobs, probes, batch_ids)
    return {
        "case": f"{PROBES} interactive behind {BACKLOG} batch, {case}",
        "batch_left": _lane_depth(metrics, "batch"),
        "overtaken": overtaken,
        "wait_p99_in_running_job": round(percentile(in_running, 99), 2),
        "mean_job_s": round(mean, 3),
        "wait_p50_s": round(percentile(waits, 50), 3),
        "wait_p99_s": round(percentile(waits, 99), 3),
        "wait_p50_jobs": round(percentile(waits, 50) / mean, 2),
        "wait_p99_jobs": round(percentile(waits, 99) / mean, 2),
    }


def _against_running(jobs: JobStore, probes: list[tuple[str, float]], others: list[str]) -> tuple[int, list[float]]:
    """What strict lanes promise, measured exactly.

    ``overtaken``: lower-lane jobs that started after an interactive job was
    in the broker (its POST had returned) and before it started: 0 under
    strict lanes without aging. For each interactive job, its wait in units
    of the duration of the job that was running when it arrived (at most ~1:
    it waits for that job and no other).
    """
    spans = [(r.started_at, r.finished_at) for r in map(jobs.get, others) if r and r.started_at and r.finished_at]
    overtaken, ratios = 0, []
    for job_id, posted_at in probes:
        record = jobs.get(job_id)
        assert record is not None and record.started_at is not None  # every probe has started by now
        overtaken += sum(posted_at < start < record.started_at for start, _ in spans)
        running = [(start, end) for start, end in spans if start <= record.created_at < end]
        if running:
            start, end = running[0]
            ratios.append((record.started_at - record.created_at) / (end - start))
    return overtaken, ratios or [0.0]


def _lane_depth(metrics: str, lane: str) -> int:
    for line in metrics.splitlines():
        if line.startswith(f'maskq_lane_depth{{lane="{lane}"}}'):
            return int(float(line.split()[-1]))
    return -1


def summary(rows: list[dict]) -> list[str]:
    return [
        f"lane_wait_p99_in_jobs={rows[0]['wait_p99_jobs']} (one image; aim <= 1.2)",
        f"lane_wait_p99_in_running_job={rows[1]['wait_p99_in_running_job']} (five images)",
        f"lane_overtaken={rows[0]['overtaken'] + rows[1]['overtaken']} (strict lanes; aim 0)",
        f"lane_wait_p99_in_jobs_with_aging={rows[2]['wait_p99_jobs']}",
    ]
