"""Where the CPU goes: CPU milliseconds per job of every kind of process the service runs, and the model's share.

The service as ``make run`` starts it (``ServiceStack``: embedded Valkey, the Procfile's worker and gunicorn,
plus the Procfile's webhooks worker; Flower too where it is installed), with the result cache on (the default).
``--clients`` threads send ``--jobs`` SAM clicks at saturation: a point on one of the photos of
``tests/data/photos``, each job its own point (so no job is a result-cache hit or coalesced), each
``POST /v1/jobs`` with ``Prefer: wait=30`` (one round trip, as an interactive client does). After a warm-up
(one click per photo, then ``--warmup`` more) every photo's embedding is cached, so a job is SAM's decoder
on a cached embedding: the interactive case, and the one where the service's own cost weighs most.

CPU time is read from ``/proc/<pid>/stat`` (``utime + stime``, in clock ticks) before and after, per kind:

- **web**: gunicorn's master and its worker processes (and any it reaped meanwhile: its ``cutime + cstime``);
- **worker main**: the ``celery worker`` process itself (its consumer, the scheduler's upkeep, heartbeats);
- **pool**: its pool processes, where the model runs (and any it reaped);
- **webhooks**: the webhooks worker and its pool; **flower**, when started;
- **valkey**: the Redis server;
- **clients**: this benchmark's own process while the clients run (not the service's; shown for scale).

The model's own time per job is read from each job's ``metrics`` (``encode + predict``: wall seconds in the
pool process; ``load`` and ``store`` are the service's, around it). Its CPU is measured too: the same clicks run
by the same adapter in this process, one after another with nothing else of ours running, timed with
``time.process_time`` (ONNX Runtime's threads included). **own** = all the service's CPU per job − that model
CPU per job: what maskq itself spends per job.

An idle row (the stack up, no clients, for a few seconds) gives each kind's CPU per second of doing nothing
(timers, heartbeats, polling), which a job at saturation also pays for, by its share of the wall time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import redis
import requests

from bench.common import ROOT, Options, ServiceStack, drive_pool, free_port, percentile
from config.settings import load_settings
from domain.images import decode_image
from models.adapters.base import Prompts, SegmentRequest
from models.catalog import ModelCatalog
from workers.devices import placement_here, runtime_options
from workers.loaded_models import LoadedModels

PHOTOS = ROOT / "tests" / "data" / "photos"
MODEL = "sam"
IDLE_S = 5.0
TICK = os.sysconf("SC_CLK_TCK")
KINDS = ("web", "worker main", "pool", "webhooks", "flower", "valkey")


def flower_installed() -> bool:
    try:
        import flower  # noqa: F401
    except ImportError:
        return False
    return True


def proc_times(pid: int) -> tuple[float, float]:
    """``(utime + stime, cutime + cstime)`` of ``pid`` in seconds, from ``/proc/<pid>/stat``; zeros once gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0, 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime) / TICK, (cutime + cstime) / TICK


def children(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kind_roots(stack: ServiceStack) -> dict[str, int]:
    roots = {"web": stack.processes["web"].pid, "worker": stack.processes["worker"].pid}
    for name in ("webhooks", "flower"):
        if name in stack.processes:
            roots[name] = stack.processes[name].pid
    if stack.redis and stack.redis.process:
        roots["valkey"] = stack.redis.process.pid
    return roots


def read_cpu(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far per kind (a process reaped meanwhile is in its parent's ``cutime``, so totals only grow)."""
    out: dict[str, float] = {}
    for name, root in roots.items():
        own, reaped = proc_times(root)
        below = sum(proc_times(pid)[0] for pid in children(root))
        if name == "worker":
            out["worker main"] = own
            out["pool"] = below + reaped
        else:
            out[name] = own + below + reaped
    out["clients"] = time.process_time()
    return out


def points_for(size: tuple[int, int], count: int) -> list[tuple[int, int]]:
    """``count`` distinct points on a grid inside an image of ``size`` (width, height)."""
    side = int(np.ceil(np.sqrt(count)))
    w, h = size
    return [(int(w * (i + 1) / (side + 1)), int(h * (j + 1) / (side + 1))) for i in range(side) for j in range(side)][
        :count
    ]


@dataclass
class Click:
    photo: str
    data: bytes
    point: tuple[int, int]

    def request_json(self) -> str:
        return json.dumps({"prompts": {"points": [[self.point[0], self.point[1], 1]]}})


def clicks(count: int) -> list[Click]:
    """``count`` clicks cycling the photos; no two alike (a new point each), so none is a result-cache hit."""
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix in {".png", ".jpg"})
    sizes = {p.name: decode_image(p.read_bytes(), max_bytes=1 << 30, max_pixels=1 << 30) for p in photos}
    per_photo = -(-count // len(photos))
    grids = {p.name: points_for((sizes[p.name].width, sizes[p.name].height), per_photo) for p in photos}
    return [
        Click(
            photos[i % len(photos)].name,
            photos[i % len(photos)].read_bytes(),
            grids[photos[i % len(photos)].name][i // len(photos)],
        )
        for i in range(count)
    ]


def send(session: requests.Session, base_url: str, click: Click) -> tuple[float, dict]:
    files: dict[str, tuple[str | None, bytes | str, str]] = {
        "image": (click.photo, click.data, "image/png" if click.photo.endswith(".png") else "image/jpeg"),
        "request": (None, click.request_json(), "application/json"),
    }
    started = time.perf_counter()
    answer = session.post(f"{base_url}/v1/jobs", files=files, headers={"Prefer": "wait=30"}, timeout=60)
    latency = time.perf_counter() - started
    job = answer.json()
    if answer.status_code != 200 or job.get("status") != "succeeded":
        raise RuntimeError(f"a click did not succeed in one round trip: {answer.status_code} {str(job)[:300]}")
    if job.get("cached") or job.get("coalesced_with"):
        raise RuntimeError("a click was answered from the result cache: the points must differ")
    return latency, job


def drive(stack: ServiceStack, work: list[Click], clients: int) -> tuple[float, list[float], list[dict]]:
    """``work`` over ``clients`` threads; ``(wall seconds, latencies, job documents)``."""
    wall, sent = drive_pool(stack, len(work), clients, lambda session, i: send(session, stack.base_url, work[i]))
    return wall, [latency for latency, _ in sent], [job for _, job in sent]


def model_cpu_per_job(work: list[Click]) -> tuple[float, float]:
    """The same clicks by the same adapter in this process: ``(CPU s per job, wall s per job)``, embeddings warm."""
    settings = load_settings()
    models = LoadedModels(ModelCatalog.from_settings(settings), runtime_options(settings, placement_here(settings)))
    models.load_all()
    adapter = models.get(MODEL)
    images = {c.photo: decode_image(c.data, max_bytes=1 << 30, max_pixels=1 << 30).pixels for c in work}
    digests = {c.photo: hashlib.sha256(c.data).hexdigest() for c in work}

    def one(c: Click) -> None:
        prompts = Prompts(points=((float(c.point[0]), float(c.point[1]), 1),))
        adapter.segment([SegmentRequest(image=images[c.photo], prompts=prompts, image_id=digests[c.photo])])

    for c in work[: len(images)]:  # each photo's embedding, as the service's warm-up made it
        one(c)
    cpu, wall = time.process_time(), time.perf_counter()
    for c in work:
        one(c)
    return (time.process_time() - cpu) / len(work), (time.perf_counter() - wall) / len(work)


def new_stack(root: Path = ROOT, env: dict[str, str] | None = None) -> ServiceStack:
    """The stack to measure (not started: use it as a context manager), with the webhooks worker and Flower."""
    also = ("webhooks", "flower") if flower_installed() else ("webhooks",)
    # Flower's port is the Procfile's variable, not a setting: a free one, as the stack's others are.
    env = {"MASKQ_FLOWER_PORT": str(free_port()), **(env or {})}
    return ServiceStack(also=also, root=root, env_extra=env)


def measure(stack: ServiceStack, options: Options, jobs: int | None = None) -> dict:
    """Warm the stack up, then one idle window and one saturated run; the raw figures (see :func:`rows`)."""
    count = jobs or options.jobs
    work = clicks(count + options.warmup + 3)
    warm, measured = work[: options.warmup + 3], work[options.warmup + 3 :]
    for c in warm[:3]:  # each photo's embedding, one at a time
        drive(stack, [c], 1)
    drive(stack, warm[3:], options.clients)
    roots = kind_roots(stack)
    before = read_cpu(roots)
    time.sleep(IDLE_S)
    after = read_cpu(roots)
    idle = {k: (after[k] - before[k]) / IDLE_S for k in after}
    client = redis.Redis.from_url(stack.redis_url)
    calls_before = command_calls(client)
    before = read_cpu(roots)
    wall, latencies, docs = drive(stack, measured, options.clients)
    after = read_cpu(roots)
    calls = {k: v - calls_before.get(k, 0) for k, v in command_calls(client).items()}
    used = {k: after[k] - before[k] for k in after}
    phases = {
        phase: sum(d.get("metrics", {}).get(phase, 0.0) for d in docs) / len(docs)
        for phase in ("load", "encode", "predict", "store")
    }
    # Redis commands per job, by command (INFO's own calls taken out): every one is a round trip for someone.
    calls["info"] = calls.get("info", 0) - 1
    per_job = {k: round(v / len(docs), 1) for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v > 0}
    return {
        "jobs": len(docs),
        "wall_s": wall,
        "latencies": latencies,
        "used": used,
        "idle": idle,
        "phases": phases,
        "redis_calls": per_job,
    }


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls so far per Redis command (``INFO commandstats``)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def rows(figures: dict, model_cpu_s: float, label: str = "") -> list[dict]:
    """One row per kind (CPU ms per job, and idle CPU ms per second), then the totals and the model's share."""
    jobs, used, idle, phases = figures["jobs"], figures["used"], figures["idle"], figures["phases"]
    prefix = f"{label}: " if label else ""
    out = [
        {
            "case": prefix + kind,
            "cpu_ms_per_job": round(used[kind] * 1000 / jobs, 2),
            "idle_cpu_ms_per_s": round(idle[kind] * 1000, 1),
        }
        for kind in KINDS
        if kind in used
    ]
    service = sum(used[k] for k in KINDS if k in used) / jobs
    model_ms = (phases["encode"] + phases["predict"]) * 1000
    out += [
        {
            "case": prefix + "service, all kinds",
            "cpu_ms_per_job": round(service * 1000, 2),
            "idle_cpu_ms_per_s": round(sum(idle[k] for k in KINDS if k in idle) * 1000, 1),
        },
        {
            "case": prefix + "model: ONNX Runtime CPU (same clicks, in process)",
            "cpu_ms_per_job": round(model_cpu_s * 1000, 2),
        },
        {"case": prefix + "own: service - model", "cpu_ms_per_job": round((service - model_cpu_s) * 1000, 2)},
        {
            "case": prefix + "clients (this process; not the service)",
            "cpu_ms_per_job": round(used["clients"] * 1000 / jobs, 2),
        },
    ]
    out[0].update(
        _jobs=jobs,
        _jobs_per_s=round(jobs / figures["wall_s"], 2),
        _p50_ms=round(percentile(figures["latencies"], 50) * 1000, 1),
        _model_wall_ms=round(model_ms, 2),
        _phases_ms={k: round(v * 1000, 2) for k, v in phases.items()},
        _redis_calls_per_job=figures["redis_calls"],
    )
    return out


def run(options: Options) -> list[dict]:
    with new_stack() as stack:
        figures = measure(stack, options)
    model_cpu_s, _ = model_cpu_per_job(clicks(options.jobs))
    return rows(figures, model_cpu_s)


def summary(rows_: list[dict]) -> list[str]:
    first = rows_[0]
    own = next(r for r in rows_ if r["case"].endswith("own: service - model"))
    return [
        f"cpu_per_job: {first['_jobs']} SAM clicks at {first['_jobs_per_s']} jobs/s (p50 {first['_p50_ms']} ms); "
        f"model in the worker (encode + predict, wall) {first['_model_wall_ms']} ms/job; "
        f"phases ms/job {first['_phases_ms']}",
        "Redis commands per job: "
        + f"{sum(first['_redis_calls_per_job'].values()):.1f} ("
        + ", ".join(f"{k} {v}" for k, v in first["_redis_calls_per_job"].items())
        + ")",
        f"own_cpu_ms_per_job={own['cpu_ms_per_job']}",
    ]
