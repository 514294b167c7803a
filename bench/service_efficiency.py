"""How much of the model's own throughput the whole service delivers.

Two measurements on the same images, back to back in one run:

- **raw**: the model path alone, in this process, one job after another,
  as one worker process runs it: ``adapter.segment`` (preprocess, predict,
  postprocess) and ``workers.pipeline.store_result`` (COCO RLE of every
  mask, bbox/area, the result JSON written to a local storage folder; that
  write is a few kilobytes and well under 1 % of a job, kept because the
  pipeline does it in the same function). The images are decoded once
  beforehand with the worker's own ``decode_image``: decoding is job
  overhead the service pays and the raw loop does not. The adapter is set
  up with the same ONNX Runtime thread and provider settings as the
  worker (``MASKQ_ORT_*`` from the same ``Settings``).
- **service**: Redis, one ``celery worker`` and gunicorn as ``make run``
  starts them; ``--clients`` threads each submit a job (multipart) and
  long-poll ``GET /v1/jobs/{id}?wait=30`` until it ends; ``--jobs`` jobs
  after ``--warmup`` discarded ones. Latency is submit to end as the client
  sees it, so it includes waiting in the lane behind the other clients' jobs.
  The result cache is switched off (``MASKQ_RESULT_CACHE_ENABLED=false``):
  with five images repeated, every job would otherwise be a cache hit or
  coalesced with an identical one in flight.

Both cycle the same images in the same order, so any multiple of the image
count has the same mix. The jobs are measured in ``--rounds`` alternating
rounds (raw, service, service, raw, ...: ABBA, so a steady drift in the
machine's load costs both sides alike) while the stack stays up; a raw round
starts only after every job of the service round before it has ended, so
the raw loop never runs while the worker is busy (the idle stack's timers
are metered in the raw rounds too). Per round, the CPU seconds of every
process of ours and of all other processes on the machine are recorded: a
round in which other processes ran is not a clean measurement.

``service_efficiency`` = service jobs/s ÷ raw jobs/s.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from bench.common import CpuMeter, Options, ServiceStack, drive_clients, load_images, throughput_row
from config.settings import load_settings
from domain.images import decode_image
from domain.records import JobRecord
from domain.schemas import JobRequest
from models.adapters.base import ModelAdapter, SegmentRequest
from models.catalog import ModelCatalog
from storage.local import LocalStorage
from workers import pipeline
from workers.devices import placement_here, runtime_options
from workers.loaded_models import LoadedModels

RAW = "raw model path (1 process)"
SERVICE = "service (HTTP, {clients} clients)"


def load_default_model(settings) -> ModelAdapter:
    """The default model, set up as ``workers.process.WorkerProcess.start`` sets it up."""
    runtime = runtime_options(settings, placement_here(settings))  # on the worker's device (a GPU where there is one)
    models = LoadedModels(ModelCatalog.from_settings(settings), runtime)
    models.load_all()
    return models.get(models.catalog.current().default)


class RawLoop:
    """The model path of one worker process, job after job, without queue, records or HTTP."""

    def __init__(self, settings, images: list[tuple[str, bytes]], storage_dir: str):
        self.settings = settings
        self.adapter = load_default_model(settings)
        self.storage = LocalStorage(storage_dir)
        # What a client that sends no "request" part gets: the default model, lane and outputs.
        self.lane = settings.default_lane
        self.request = JobRequest(model=self.adapter.name, lane=self.lane)
        self.prompts = pipeline.to_prompts(self.request)
        self.pixels = [
            decode_image(data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels).pixels
            for _, data in images
        ]
        # The worker names each image by the SHA-256 of its bytes; an adapter that reuses work per
        # image must get the same chance here.
        self.image_ids = [hashlib.sha256(data).hexdigest() for _, data in images]

    def job(self, i: int) -> float:
        """Run job ``i`` (image ``i`` mod the image count); its seconds."""
        pixels, image_id = self.pixels[i % len(self.pixels)], self.image_ids[i % len(self.pixels)]
        record = JobRecord(
            id=uuid.uuid4().hex,
            tenant="bench",
            lane=self.lane,
            model=self.adapter.name,
            input_key="",
            image_sha256=image_id,
            width=pixels.shape[1],
            height=pixels.shape[0],
            request=self.request.model_dump(mode="json"),  # type: ignore[arg-type]  # its stored form
        )
        started = time.perf_counter()
        request = SegmentRequest(image=pixels, prompts=self.prompts, image_id=image_id)
        instances = self.adapter.segment([request])[0]
        pipeline.store_result(record, self.request, pixels, instances, self.storage)
        return time.perf_counter() - started


def split(jobs: int, rounds: int) -> list[tuple[int, int]]:
    """``(first job, count)`` per round; the last round takes the remainder."""
    per = max(1, jobs // rounds)
    bounds = [(r * per, per) for r in range(min(rounds, jobs))]
    first, _ = bounds[-1]
    bounds[-1] = (first, jobs - first)
    return bounds


@dataclass
class Tally:
    """What one side of the comparison (raw or service) adds up over the rounds."""

    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    rates: list[float] = field(default_factory=list)  # jobs/s per round
    other_cpu_s: list[float] = field(default_factory=list)  # other processes' CPU s per round

    def add(self, wall_s: float, latencies: list[float], cpu_s: dict[str, float]) -> None:
        self.wall_s += wall_s
        self.latencies += latencies
        self.cpu_s = {k: round(self.cpu_s.get(k, 0.0) + cpu_s.get(k, 0.0), 2) for k in {**self.cpu_s, **cpu_s}}
        self.rates.append(round(len(latencies) / wall_s, 3))
        self.other_cpu_s.append(cpu_s["other"])

    def row(self, case: str, **extra) -> dict:
        return throughput_row(
            case,
            self.latencies,
            self.wall_s,
            **extra,
            _rounds_jobs_per_s=self.rates,
            _cpu_s=self.cpu_s,
            _rounds_other_cpu_s=self.other_cpu_s,
        )


def run(options: Options) -> list[dict]:
    images = load_images(options.images)
    settings = load_settings()
    raw, service, outcomes = Tally(), Tally(), []
    with tempfile.TemporaryDirectory(prefix="maskq-bench-raw-") as storage_dir:
        loop = RawLoop(settings, images, storage_dir)
        for i in range(len(images)):  # warm-up: the first run of each input shape allocates
            loop.job(i)
        gc.collect()
        # Five images over and over would be answered from the result cache, which is not the model
        # path: switched off here (a cache benchmark measures the cache).
        with ServiceStack(overrides={"result_cache_enabled": False}) as stack:
            ort_settings = lambda s: (s.ort_intra_op_threads, s.ort_inter_op_threads, s.ort_providers)  # noqa: E731
            assert ort_settings(stack.settings) == ort_settings(settings)
            # The raw loop's model, named: without prompts, a job naming none would be routed to SAM.
            request_json = json.dumps({"model": loop.adapter.name})
            drive_clients(stack, images, options.warmup, options.clients, request_json=request_json)
            # The idle stack is metered during the raw rounds too, so that its timers are not taken for noise.
            groups = {"bench": [os.getpid()], **stack.pids()}
            for r, (first, count) in enumerate(split(options.jobs, options.rounds)):
                # ABBA order: a steady drift in the machine's load costs both sides alike.
                for side in ("raw", "service") if r % 2 == 0 else ("service", "raw"):
                    meter = CpuMeter(groups).start()
                    if side == "raw":  # only ever while the worker is idle: every service job has ended
                        started = time.perf_counter()
                        latencies = [loop.job(i) for i in range(first, first + count)]
                        raw.add(time.perf_counter() - started, latencies, meter.stop())
                    else:
                        wall, done = drive_clients(
                            stack, images, count, options.clients, first=first, request_json=request_json
                        )
                        service.add(wall, [o.latency_s for o in done], meter.stop())
                        outcomes += done
    return [
        raw.row(RAW, _ort_threads=[settings.ort_intra_op_threads, settings.ort_inter_op_threads]),
        service.row(
            SERVICE.format(clients=options.clients),
            failed=sum(o.status != "succeeded" for o in outcomes),
            cached=sum(o.cached for o in outcomes),
            _worker_busy_s=round(sum(o.run_s or 0.0 for o in outcomes), 2),
        ),
    ]


def summary(rows: list[dict]) -> list[str]:
    raw, service = rows
    ratios = [s / r for s, r in zip(service["_rounds_jobs_per_s"], raw["_rounds_jobs_per_s"])]
    lines = [
        f"ORT intra/inter-op threads {raw['_ort_threads'][0]}/{raw['_ort_threads'][1]} (0 = ORT's default)",
        "jobs/s per round, raw: "
        + ", ".join(map(str, raw["_rounds_jobs_per_s"]))
        + "; service: "
        + ", ".join(map(str, service["_rounds_jobs_per_s"]))
        + "; ratio per round: "
        + ", ".join(f"{x:.2f}" for x in ratios),
        # Other processes' CPU seconds in each round: a round where they ran is not a clean measurement.
        "CPU s of other processes per round, raw: "
        + ", ".join(map(str, raw["_rounds_other_cpu_s"]))
        + "; service: "
        + ", ".join(map(str, service["_rounds_other_cpu_s"])),
        "CPU s per job, raw: " + _per_job(raw),
        "CPU s per job, service: " + _per_job(service),
        # Where a shortfall comes from: jobs that run slower in the worker, or a worker left idle between jobs.
        f"seconds per job, raw: {raw['wall_s'] / raw['jobs']:.3f}; in the worker (started_at to finished_at): "
        f"{service['_worker_busy_s'] / service['jobs']:.3f}; "
        f"worker busy {service['_worker_busy_s'] / service['wall_s']:.1%}"
        " of the service's wall time",
    ]
    if service["failed"] or service["cached"]:
        lines.append(f"WARNING: {service['failed']} failed and {service['cached']} cached jobs; the ratio is not valid")
    lines.append(f"service_efficiency={service['jobs_per_s'] / raw['jobs_per_s']:.3f}")
    return lines


def _per_job(row: dict) -> str:
    """Our processes' CPU per job, by group; ``other`` is everyone else's on the machine meanwhile."""
    cpu = row["_cpu_s"]
    ours = sum(v for k, v in cpu.items() if k != "other")
    parts = ", ".join(f"{k} {v / row['jobs']:.3f}" for k, v in cpu.items())
    return f"{ours / row['jobs']:.3f} ({parts})"
