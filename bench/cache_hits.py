"""Result-cache hits through the whole service: round trips per second, and the latency of one.

The service as ``make run`` starts it (``ServiceStack``: Redis, one ``celery
worker``, gunicorn), with the result cache on (the default) and the rate
limits raised out of the way: the default global limit (``6000/minute``) is
100 requests/s, and this measures the cache, not the limiter (whose checks
are still made and paid for). First each image is submitted once and run by
the worker, which fills the cache; from then on every request is an
identical submission (multipart, the bench tenant's API key) that the web
front end answers ``200`` from the cache. An answer that is not a ``200``
with ``cached: true`` fails the benchmark.

Two cases, after ``--warmup`` × 5 discarded hits:

- **one client**: one request at a time, ``--jobs`` × 5 of them: the latency of a hit;
- **``--clients`` clients**: ``--jobs`` × 10 hits: round trips per second.

A hit costs about a hundredth of a job, hence more of them per case. The
clients are lean (one keep-alive ``http.client`` connection each), because
they share the machine's cores with the service they measure. The
``worker_cpu_s`` column shows that the worker took no part.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import requests

from bench.common import (
    ROOT,
    CpuMeter,
    Options,
    ServiceStack,
    free_port,
    load_images,
    percentile,
    run_http_job,
    run_threads,
)

ONE = "cache hit (HTTP, 1 client)"
MANY = "cache hit (HTTP, {clients} clients)"
FLOOR = "web floor: "
OVERRIDES = {"result_cache_enabled": True, "global_rate": "100000000/minute"}


class Client:
    """One keep-alive HTTP connection that sends identical submissions.

    A lean client (``http.client``, the multipart body built by hand), so that
    the load generator, which shares the machine's cores with the service,
    takes as little of them as it can. Each request still gets a boundary of
    its own, as from any HTTP library, so the server parses it afresh.
    """

    def __init__(self, server: Server):
        self.connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
        self.headers = dict(server.headers)

    def hit(self, name: str, data: bytes) -> float:
        """One identical submission; its round-trip seconds. Raises unless the cache answered it."""
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                f"Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {**self.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"}
        started = time.perf_counter()
        self.connection.request("POST", "/v1/jobs", body=body, headers=headers)
        answer = self.connection.getresponse()
        text = answer.read()
        elapsed = time.perf_counter() - started
        job = json.loads(text) if answer.getheader("content-type", "").startswith("application/json") else {}
        if answer.status != 200 or not job.get("cached") or job.get("status") != "succeeded":
            raise RuntimeError(f"not a cache hit: {answer.status} {text[:300]!r}")
        return elapsed

    def close(self) -> None:
        self.connection.close()


@dataclass(frozen=True)
class Server:
    """Where the clients send their hits, and the headers they send (maskq's API key, or none)."""

    host: str
    port: int
    headers: dict[str, str]

    @classmethod
    def of(cls, stack: ServiceStack) -> Server:
        return cls(stack.settings.host, stack.settings.port, dict(stack.headers))


def drive(server: Server, images: list[tuple[str, bytes]], count: int, clients: int) -> tuple[float, list[float]]:
    """``count`` hits over ``clients`` threads; ``(wall seconds, latencies)``."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[BaseException] = []

    def client() -> None:
        own = Client(server)
        try:
            while not errors:
                with lock:
                    i = next(counter)
                if i >= count:
                    return
                try:
                    elapsed = own.hit(*images[i % len(images)])
                except BaseException as exc:
                    errors.append(exc)
                    return
                with lock:
                    latencies.append(elapsed)
        finally:
            own.close()

    wall = run_threads(client, clients, "bench-hit")
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed; first: {errors[0]!r}") from errors[0]
    return wall, latencies


def row(case: str, wall_s: float, latencies: list[float], cpu_s: dict[str, float]) -> dict:
    return {
        "case": case,
        "requests": len(latencies),
        "wall_s": round(wall_s, 2),
        "per_s": round(len(latencies) / wall_s, 1),
        **{f"p{q}_ms": round(percentile(latencies, q) * 1000, 2) for q in (50, 95, 99)},
        "worker_cpu_s": cpu_s.get("worker", 0.0),
        "_cpu_s": cpu_s,
    }


def run(options: Options) -> list[dict]:
    images = load_images(options.images)
    rows = []
    with ServiceStack(overrides=OVERRIDES) as stack:
        with requests.Session() as session:
            session.headers.update(stack.headers)
            for name, data in images:  # the worker runs each once: the cache fills
                outcome = run_http_job(session, stack.base_url, name, data)
                if outcome.status != "succeeded":
                    raise RuntimeError(f"the job that fills the cache for {name} ended {outcome.status}")
        groups = {"bench": [os.getpid()], **stack.pids()}
        server = Server.of(stack)
        # The worker fills the cache just after a job's record ends: warm-up hits also wait that out.
        deadline = time.monotonic() + 30
        while True:
            try:
                drive(server, images, len(images), 1)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        rows += measure(server, images, options, groups, "")
        settings = stack.settings
    # The floor, right after on the same machine: a bare Flask app under the same gunicorn settings.
    with web_floor(settings.web_workers, settings.web_threads) as (floor, pids):
        rows += measure(floor, images, options, {"bench": [os.getpid()], "web": pids}, FLOOR)
    return rows


def measure(server: Server, images, options: Options, groups: dict[str, list[int]], prefix: str) -> list[dict]:
    """The two cases (one client, many) against one server, after a discarded warm-up."""
    drive(server, images, options.warmup * 5, options.clients)
    rows = []
    for case, count, clients in (
        (ONE, options.jobs * 5, 1),
        (MANY.format(clients=options.clients), options.jobs * 10, options.clients),
    ):
        meter = CpuMeter(groups).start()
        wall, latencies = drive(server, images, count, clients)
        rows.append(row(prefix + case, wall, latencies, meter.stop()))
    return rows


@contextlib.contextmanager
def web_floor(workers: int, threads: int) -> Iterator[tuple[Server, list[int]]]:
    """``bench/web_floor.py`` under gunicorn (gthread, maskq's worker and thread counts); its server and pids."""
    port = free_port()
    command = [
        sys.executable, "-m", "gunicorn", "-k", "gthread", "--workers", str(workers), "--threads", str(threads),
        "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "bench.web_floor:create_app()",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    requests.get(f"http://127.0.0.1:{port}/", timeout=1)
                    break
                except requests.ConnectionError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        errors.seek(0)
                        raise RuntimeError(f"the web floor did not start: {errors.read()[-2000:]!r}") from None
                    time.sleep(0.2)
            children = psutil.Process(process.pid).children()
            yield Server("127.0.0.1", port, {}), [process.pid, *(c.pid for c in children)]
        finally:
            process.terminate()
            process.wait(timeout=20)


def summary(rows: list[dict]) -> list[str]:
    one, many, floor_one, floor_many = rows
    cpu = many["_cpu_s"]
    ours = sum(v for k, v in cpu.items() if k != "other")
    return [
        f"CPU ms per hit ({many['requests']} concurrent hits): "
        + ", ".join(f"{k} {v * 1000 / many['requests']:.2f}" for k, v in cpu.items())
        + f"; ours {ours * 1000 / many['requests']:.2f}",
        f"cache_hit_p50_ms={one['p50_ms']:.2f} (aim: <= 10)",
        f"cache_hits_per_s={many['per_s']:.1f} (aim: >= 300)",
        f"web floor (bare Flask, same gunicorn): {floor_many['per_s']:.1f}/s, p50 {floor_one['p50_ms']:.2f} ms;"
        f" maskq's hits are {many['per_s'] / floor_many['per_s']:.2f} of its rate",
    ]
