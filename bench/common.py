"""What every benchmark shares: options, images, percentiles, tables, CPU accounting, the service stack.

A benchmark is a module ``bench/<name>.py`` with ``run(options) -> rows``
(each row a dict of column name to value; keys starting with ``_`` are kept
in the JSON results but not printed) and, optionally,
``summary(rows) -> lines``. ``python -m bench`` finds them by name.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NoReturn, TypeVar

import numpy as np
import psutil
import redis
import requests

from config.settings import Settings, load_settings
from runtime.embedded_redis import RedisServer
from stores.tenants import KeyStore

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "images"
ENDED = {"succeeded", "failed", "canceled", "expired"}


@dataclass(frozen=True)
class Options:
    """What ``python -m bench`` passes to every benchmark's ``run``."""

    jobs: int = 80  # measured jobs per case
    clients: int = 16  # concurrent HTTP clients
    warmup: int = 10  # jobs run and discarded before measuring
    rounds: int = 4  # cases compared are measured in this many alternating rounds (drift hits all alike)
    images: Path = IMAGES


def load_images(folder: Path) -> list[tuple[str, bytes]]:
    """``(file name, bytes)`` of every image in ``folder``, by name, so every run cycles them in one order."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    if not paths:
        raise SystemExit(f"no images in {folder}")
    return [(p.name, p.read_bytes()) for p in paths]


def percentile(values, q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; NaN for no values."""
    return float(np.percentile(values, q)) if len(values) else float("nan")


def throughput_row(case: str, latencies_s: list[float], wall_s: float, **extra) -> dict:
    """The standard columns: jobs, wall time, jobs/s and p50/p95/p99 latency in seconds."""
    return {
        "case": case,
        "jobs": len(latencies_s),
        "wall_s": round(wall_s, 2),
        "jobs_per_s": round(len(latencies_s) / wall_s, 3),
        **{f"p{q}_s": round(percentile(latencies_s, q), 3) for q in (50, 95, 99)},
        **extra,
    }


def format_table(title: str, rows: list[dict]) -> str:
    """Rows as a Markdown table (it pastes into docs/benchmarks.md as is)."""
    columns = list(dict.fromkeys(k for row in rows for k in row if not k.startswith("_")))
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    out = [f"### {title}", "", line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(r) for r in cells])


def machine() -> dict:
    """What the figures were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "load_avg": [round(v, 2) for v in os.getloadavg()]}


class CpuMeter:
    """CPU seconds used by named groups of processes, and by everything else on the machine.

    ``other`` is the machine's busy time minus the groups' time: on a shared
    machine it says how much of the measurement competed with strangers.
    """

    def __init__(self, groups: dict[str, list[int]]):
        self.groups = groups
        self._start: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        out = {}
        for name, pids in self.groups.items():
            total = 0.0
            for pid in pids:
                try:
                    process = psutil.Process(pid)
                    # The benchmark's own children are the stack under test, counted in their own groups.
                    children = process.children(recursive=True) if pid != os.getpid() else []
                    for p in [process, *children]:
                        t = p.cpu_times()
                        total += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            out[name] = total
        machine = psutil.cpu_times()
        # Linux already counts guest time inside user, and steal is not time this machine got.
        out["_machine"] = (
            machine.user
            + machine.nice
            + machine.system
            + getattr(machine, "irq", 0.0)
            + getattr(machine, "softirq", 0.0)
        )
        return out

    def start(self) -> CpuMeter:
        self._start = self._read()
        return self

    def stop(self) -> dict[str, float]:
        end = self._read()
        used = {k: round(end[k] - self._start[k], 2) for k in end}
        machine_s = used.pop("_machine")
        used["other"] = round(max(0.0, machine_s - sum(used.values())), 2)
        return used


def procfile(root: Path = ROOT) -> dict[str, str]:
    """The Procfile's commands by process name."""
    lines = (root / "Procfile").read_text().splitlines()
    return {
        name.strip(): command.strip()
        for name, _, command in (line.partition(":") for line in lines if line.strip() and not line.startswith("#"))
    }


def _env_value(value) -> str:
    """A setting as pydantic-settings reads it from the environment (JSON for the complex ones)."""
    return json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServiceStack:
    """The service as ``make run`` starts it, in a temp folder: embedded Redis, one ``celery worker``, gunicorn.

    ``overrides`` are extra settings (``{"worker_concurrency": 2}``) for
    this stack only; everything else comes from the environment, as for
    ``make run``. Use as a context manager; logs stay in ``data_dir`` until
    ``stop`` removes it (they are printed if start-up fails).
    """

    overrides: dict = field(default_factory=dict)
    # Extra arguments for each worker to start (the Procfile's command plus these: "-Q", "-n"...);
    # None: the Procfile's one worker.
    workers: list[list[str]] | None = None
    # Other Procfile processes to start as well ("webhooks", "flower"), after the workers and before the web.
    also: tuple[str, ...] = ()
    # Extra environment for every process of this stack (not settings: say, a library's own variable).
    env_extra: dict[str, str] = field(default_factory=dict)
    # The checkout whose Procfile, code and .venv run the stack (another one to compare builds in one run).
    root: Path = ROOT
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="maskq-bench-")))
    redis: RedisServer | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def redis_url(self) -> str:
        """The stack's Redis (started by :meth:`start`)."""
        assert self.redis is not None, "the stack has not started"
        return self.redis.url

    def start(self, timeout: float = 120) -> ServiceStack:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self.redis = RedisServer(free_port(), self.data_dir / "redis")
        with _output_to(self.data_dir / "redis.log"):  # RedisServer lets its server write to our terminal
            self.redis.start()
        # The clients share one API key: its cap on long polls held at once (8) is raised out of the way,
        # as its rate limit is (_authorization); the web's threads still bound them.
        values = {
            "redis_url": self.redis.url,
            "data_dir": self.data_dir,
            "host": "127.0.0.1",
            "port": free_port(),
            "max_waits_per_key": 1000,
            **self.overrides,
        }
        self.settings: Settings = load_settings(**values)
        self.env = {
            **os.environ,
            **{f"MASKQ_{k.upper()}": _env_value(v) for k, v in values.items()},
            **self.env_extra,
        }
        self.base_url = f"http://{self.settings.host}:{self.settings.port}"
        # The Procfile's own commands, so the benchmark measures what `make run` runs.
        commands = procfile(self.root)
        for i, extra in enumerate(self.workers or [[]]):
            self._spawn("worker" if i == 0 else f"worker-{i + 1}", f"{commands['worker']} {shlex.join(extra)}")
        for name in self.also:
            self._spawn(name, commands[name])
        self._spawn("web", commands["web"])
        self._wait_ready(timeout)
        self.headers = self._authorization()

    def _authorization(self) -> dict[str, str]:
        """Headers for the benchmark's clients: a fresh API key of tenant "bench", unless auth is off.

        The key gets a rate limit no benchmark reaches: the benchmarks measure
        throughput, and the limiter's checks are still made (and paid for).
        """
        if self.settings.auth == "off":
            return {}
        key, _ = KeyStore(redis.Redis.from_url(self.redis_url)).create("bench", rate="1000000/minute", label="bench")
        return {"Authorization": f"Bearer {key}"}

    def _spawn(self, name: str, command: str) -> None:
        """A Procfile command line, run by the shell as honcho runs it (its ``exec`` and ``VAR=value``)."""
        with (self.data_dir / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                ["/bin/sh", "-c", command],
                cwd=self.root,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    self._fail(f"{name} exited at start (code {process.returncode})")
            try:
                if requests.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self._fail(f"the service was not ready within {timeout}s")
            time.sleep(0.2)

    def _fail(self, why: str) -> NoReturn:
        tails = "\n".join(f"--- {name}.log\n{self.log(name)[-3000:]}" for name in self.processes)
        raise RuntimeError(f"{why}\n{tails}")

    def log(self, name: str) -> str:
        path = self.data_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pids(self) -> dict[str, list[int]]:
        """Process groups for :class:`CpuMeter` (children are counted with their parent)."""
        groups = {name: [p.pid] for name, p in self.processes.items()}
        if self.redis and self.redis.process:
            groups["redis"] = [self.redis.process.pid]
        return groups

    def stop(self, timeout: float = 20) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()
        if self.redis:
            self.redis.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> ServiceStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def _output_to(path: Path):
    """Point this process's stdout and stderr at ``path`` while the block runs, so children started in it inherit
    the file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


@dataclass
class JobOutcome:
    """One job as a client saw it; ``run_s`` is its time in the worker (``finished_at - started_at``)."""

    latency_s: float
    status: str
    cached: bool
    run_s: float | None = None


def run_http_job(
    session: requests.Session, base_url: str, name: str, data: bytes, request_json: str | None = None, wait_s: int = 30
) -> JobOutcome:
    """Submit one image (multipart) and long-poll it to its end, as a client of the API does."""
    files: dict[str, tuple[str | None, bytes | str, str]] = {"image": (name, data, "image/jpeg")}
    if request_json is not None:
        files["request"] = (None, request_json, "application/json")
    started = time.perf_counter()
    answer = session.post(f"{base_url}/v1/jobs", files=files, timeout=60)
    if answer.status_code not in (200, 202):
        raise RuntimeError(f"POST /v1/jobs answered {answer.status_code}: {answer.text[:500]}")
    job = answer.json()
    while job["status"] not in ENDED:
        answer = session.get(f"{base_url}/v1/jobs/{job['id']}", params={"wait": wait_s}, timeout=wait_s + 30)
        answer.raise_for_status()
        job = answer.json()
    run_s = None
    if job.get("started_at") and job.get("finished_at"):
        run_s = (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()
    return JobOutcome(time.perf_counter() - started, job["status"], bool(job.get("cached")), run_s)


def drive_clients(
    stack: ServiceStack,
    images: list[tuple[str, bytes]],
    jobs: int,
    clients: int,
    first: int = 0,
    request_json: str | None = None,
) -> tuple[float, list[JobOutcome]]:
    """``jobs`` jobs on ``stack`` over ``clients`` threads, each with its own session; ``(wall seconds, outcomes)``.

    Job ``i`` uses image ``(first + i) % len(images)``, so any run of a
    multiple of ``len(images)`` jobs has the same mix as the raw loop.
    ``request_json`` is each job's request part (say, the model: a job
    without prompts and without a model goes to the manifest's ``none`` route,
    segment-everything on SAM).
    """

    def one(session: requests.Session, i: int) -> JobOutcome:
        name, data = images[(first + i) % len(images)]
        return run_http_job(session, stack.base_url, name, data, request_json)

    return drive_pool(stack, jobs, clients, one)


def drive_pool(
    stack: ServiceStack, count: int, clients: int, one: Callable[[requests.Session, int], T], name: str = "bench-client"
) -> tuple[float, list[T]]:
    """``one(session, i)`` for ``i`` in ``range(count)``, over ``clients`` threads each with its own authorised
    session; ``(wall seconds, results in the order they ended)``. The first failure stops every client."""
    counter = itertools.count()
    lock = threading.Lock()
    results: list[T] = []
    errors: list[BaseException] = []

    def client() -> None:
        with requests.Session() as session:
            session.headers.update(stack.headers)
            while not errors:
                with lock:
                    i = next(counter)
                if i >= count:
                    return
                try:
                    result = one(session, i)
                except BaseException as exc:
                    errors.append(exc)
                    return
                with lock:
                    results.append(result)

    wall = run_threads(client, clients, name)
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed; first: {errors[0]!r}") from errors[0]
    return wall, results


def run_threads(target, count: int, name: str) -> float:
    """Run ``target`` in ``count`` threads at once; the wall seconds until the last one ends."""
    threads = [threading.Thread(target=target, name=f"{name}-{n}") for n in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started
