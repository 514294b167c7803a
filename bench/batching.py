"""What dynamic batching does to a worker's throughput on a queue that is already full.

Two service stacks (Redis, one ``celery worker``, gunicorn, as ``make run``
starts them) with the same model manifest, in which the bundled text-regions
model, declared to stack batches (:class:`StackingTextRegionsAdapter`; the
detector itself still loops image by image), takes up to :data:`BATCH_SIZE`
jobs per batch; one runs with ``MASKQ_BATCHING=false``. What it measures is
the batching machinery on the real model: what claiming, waiting and ending
jobs together gains or costs where inference does not get cheaper per job.
Each round closes a stack's resource gate (``maskq:gate:reserve_mb``, so its
worker takes nothing), submits the round's jobs over HTTP, opens the gate
and waits until every job has ended. Throughput is the round's jobs over the
time from the first job's start to the last job's end (the job records'
``started_at`` and ``finished_at``), so submitting and the gate's own delay
count on neither side. Only one stack works at a time; the rounds alternate
(ABBA) so that drift in the machine's load biases neither side. The result
cache is off: the images repeat, and a cache hit is not the model path.

``batched_over_unbatched`` = batched jobs/s ÷ unbatched jobs/s.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import requests

from bench.common import ENDED, CpuMeter, Options, ServiceStack, load_images, throughput_row
from bench.service_efficiency import split
from config.settings import load_settings
from domain.keys import GATE_RESERVE_MB as RESERVE_OVERRIDE_KEY
from models.adapters.text_regions import TextRegionsAdapter
from models.catalog import ModelCatalog
from stores.fleet import gate_states

BATCH_SIZE = 8
BATCHED = f"batched (max_batch_size={BATCH_SIZE})"
UNBATCHED = "unbatched (MASKQ_BATCHING=false)"
CLOSED = 10**9  # a reserve no machine has free: the gate shuts


class StackingTextRegionsAdapter(TextRegionsAdapter):
    """The bundled text-regions model, declared to stack batches so that dynamic batching runs on it."""

    stacks_batches = True


STACKING = f"{__name__}:{StackingTextRegionsAdapter.__name__}"


def batching_manifest(folder: Path) -> Path:
    """The deployment's text-regions model alone, on :class:`StackingTextRegionsAdapter`, up to :data:`BATCH_SIZE`
    jobs a batch."""
    catalog = ModelCatalog.from_settings(load_settings())
    spec = catalog.spec("text-regions")
    # Strings and numbers as JSON writes them are TOML too; the files are absolute paths already.
    lines = [
        f"default = {json.dumps(spec.name)}",
        f"[models.{json.dumps(spec.name)}]",
        f"version = {json.dumps(spec.version)}",
        f"adapter = {json.dumps(STACKING)}",
        f"memory_mb = {spec.memory_mb}",
        f"max_batch_size = {BATCH_SIZE}",
    ]
    if spec.files:
        lines.append(
            "files = { " + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in spec.files.items()) + " }"
        )
    if spec.providers:
        lines.append(f"providers = {json.dumps(list(spec.providers))}")
    if spec.fp16:
        lines.append("fp16 = true")
    if spec.options:
        lines.append(
            "options = { " + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in spec.options.items()) + " }"
        )
    path = folder / "models.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Side:
    """One stack and what its rounds added up to."""

    def __init__(self, case: str, stack: ServiceStack):
        self.case = case
        self.stack = stack
        self.redis = redis.Redis.from_url(stack.redis_url)
        self.session = requests.Session()
        self.session.headers.update(stack.headers)
        self.span_s = 0.0
        self.latencies: list[float] = []
        self.rates: list[float] = []
        self.other_cpu_s: list[float] = []
        self.batches: set[str] = set()
        self.alone = 0
        self.busy_s = 0.0  # the worker's time in inference calls: a batch from its first start to its last end
        self.worker_cpu_s = 0.0
        self.failed = 0

    def close_gate(self, timeout: float = 30) -> None:
        self.redis.set(RESERVE_OVERRIDE_KEY, CLOSED)
        deadline = time.monotonic() + timeout
        while not (states := gate_states(self.redis)) or any(s["open"] for s in states.values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.case}: the worker's gate did not close in {timeout} s")
            time.sleep(0.05)

    def submit(self, images: list[tuple[str, bytes]], first: int, count: int) -> list[str]:
        ids = []
        for i in range(first, first + count):
            name, data = images[i % len(images)]
            answer = self.session.post(f"{self.stack.base_url}/v1/jobs", files={"image": (name, data)}, timeout=60)
            if answer.status_code != 202:
                raise RuntimeError(f"POST /v1/jobs answered {answer.status_code}: {answer.text[:300]}")
            ids.append(answer.json()["id"])
        return ids

    def drain(self, ids: list[str], timeout: float) -> list[list[Any]]:  # [opened at, status, started, finished, batch]
        """Open the gate; wait until every job has ended; their records' timing and batch fields."""
        opened = time.time()
        self.redis.delete(RESERVE_OVERRIDE_KEY)
        deadline = time.monotonic() + timeout
        while True:
            with self.redis.pipeline() as pipe:
                for job_id in ids:
                    pipe.hmget(f"maskq:job:{job_id}", "status", "started_at", "finished_at", "batch_id")
                fields = pipe.execute()
            if all(f[0] is not None and f[0].decode() in ENDED for f in fields):
                self.close_gate()
                return [[opened, *f] for f in fields]
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.case}: jobs still not ended after {timeout} s")
            time.sleep(0.05)

    def round(self, images, first: int, count: int, measure: bool = True) -> None:
        ids = self.submit(images, first, count)
        meter = CpuMeter(self.stack.pids()).start()
        fields = self.drain(ids, timeout=60 + 10 * count)
        cpu = meter.stop()
        if not measure:
            return
        opened = fields[0][0]
        started = min(float(f[2]) for f in fields if f[2])
        finished = [float(f[3]) for f in fields]
        span = max(finished) - started
        self.span_s += span
        self.latencies += [t - opened for t in finished]
        self.rates.append(round(count / span, 3))
        self.other_cpu_s.append(cpu["other"])
        self.worker_cpu_s += cpu["worker"]
        self.failed += sum(f[1].decode() != "succeeded" for f in fields)
        self.batches |= {f[4].decode() for f in fields if f[4]}
        self.alone += sum(not f[4] for f in fields)
        calls: dict[str, list[float]] = {}
        for i, f in enumerate(fields):
            calls.setdefault(f[4].decode() if f[4] else str(i), []).extend([float(f[2]), float(f[3])])
        self.busy_s += sum(max(times) - min(times) for times in calls.values())

    def row(self) -> dict:
        runs = len(self.batches) + self.alone  # inference calls: batches, and jobs that ran alone
        return throughput_row(
            self.case,
            self.latencies,
            self.span_s,
            failed=self.failed,
            mean_batch=round(len(self.latencies) / runs, 2) if runs else 0,
            worker_cpu_s_per_job=round(self.worker_cpu_s / max(len(self.latencies), 1), 3),
            _rounds_jobs_per_s=self.rates,
            _rounds_other_cpu_s=self.other_cpu_s,
            _busy_s=round(self.busy_s, 2),
        )


def run(options: Options) -> list[dict]:
    images = load_images(options.images)
    with tempfile.TemporaryDirectory(prefix="maskq-bench-batching-") as folder:
        manifest = batching_manifest(Path(folder))
        common = {"models_manifest": manifest, "result_cache_enabled": False, "gate_check_s": 0.05}
        with (
            ServiceStack(overrides={**common, "batching": True}) as batched_stack,
            ServiceStack(overrides={**common, "batching": False}) as unbatched_stack,
        ):
            batched, unbatched = Side(BATCHED, batched_stack), Side(UNBATCHED, unbatched_stack)
            for side in (batched, unbatched):
                side.close_gate()
                side.round(images, 0, max(options.warmup, BATCH_SIZE), measure=False)
            for r, (first, count) in enumerate(split(options.jobs, options.rounds)):
                for side in (batched, unbatched) if r % 2 == 0 else (unbatched, batched):
                    side.round(images, first, count)
            return [unbatched.row(), batched.row()]


def summary(rows: list[dict]) -> list[str]:
    unbatched, batched = rows
    ratios = [b / u for b, u in zip(batched["_rounds_jobs_per_s"], unbatched["_rounds_jobs_per_s"])]
    lines = [
        "jobs/s per round, unbatched: "
        + ", ".join(map(str, unbatched["_rounds_jobs_per_s"]))
        + "; batched: "
        + ", ".join(map(str, batched["_rounds_jobs_per_s"]))
        + "; ratio per round: "
        + ", ".join(f"{x:.2f}" for x in ratios),
        # Other processes' CPU seconds in each round: a round where they ran is not a clean measurement.
        "CPU s of other processes per round, unbatched: "
        + ", ".join(map(str, unbatched["_rounds_other_cpu_s"]))
        + "; batched: "
        + ", ".join(map(str, batched["_rounds_other_cpu_s"])),
    ]
    # Where a difference comes from: slower inference calls, or a worker idle between them.
    lines.extend(
        f"{row['case']}: {row['_busy_s'] / row['jobs']:.3f} s per job in inference calls; "
        f"worker busy {row['_busy_s'] / row['wall_s']:.1%} of the span"
        for row in (unbatched, batched)
    )
    if unbatched["failed"] or batched["failed"]:
        lines.append(f"WARNING: {unbatched['failed'] + batched['failed']} jobs failed; the ratio is not valid")
    # On a shared machine the wall-clock ratio swings with the neighbours' load; the worker's own CPU
    # seconds per job do much less, and on a dedicated CPU-bound worker they set its throughput.
    lines.append(
        "batched_over_unbatched, by the worker's CPU s per job: "
        f"{unbatched['worker_cpu_s_per_job'] / batched['worker_cpu_s_per_job']:.3f}; "
        f"median of the rounds' ratios: {statistics.median(ratios):.3f}"
    )
    lines.append(f"batched_over_unbatched={batched['jobs_per_s'] / unbatched['jobs_per_s']:.3f}")
    return lines
