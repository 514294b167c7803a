"""The peers benchmark's common harness: the plan, the schedule of rounds, the outcomes and their ratio
tables (pure, unit-tested), and the stacks' base classes (``Stack``; ``PeerStack`` for a peer in its own
process serving ``POST /predict``)."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from bench.common import ROOT, Options, free_port, percentile

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
    def from_options(cls, options: Options, images: int = 5) -> Plan:
        rounds = max(1, options.rounds)
        scale = max(options.jobs, 1) / BASE_JOBS
        # A whole number of passes over the images per round, so every round has the same mix.
        per_round = max(images, round(options.jobs / rounds / images) * images)

        def scaled(n: int, least: int) -> int:
            return max(least, round(n * scale))

        return cls(
            rounds=rounds,
            steady_jobs=per_round,
            clients=max(1, options.clients),
            burst_jobs=scaled(BURST_JOBS, 10),
            burst_clients=min(BURST_CLIENTS, scaled(BURST_JOBS, 10)),
            flood_jobs=scaled(FLOOD_JOBS, 20),
            probes=min(PROBES, scaled(FLOOD_JOBS, 20)),
            repeats=scaled(REPEATS, 10),
            warmup=min(max(options.warmup, 0), 3),
        )


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
        out.append(
            (
                order,
                tuple(w for w in WORKLOADS if w in work and w != "priority")
                + (("priority",) if "priority" in work else ()),
            )
        )
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
    return {
        "accepted": sum(o.accepted for o in outcomes),
        "ok": sum(o.status == "ok" for o in outcomes),
        "rejected": sum(o.status == "rejected" for o in outcomes),
        "timed_out": sum(o.status == "timeout" for o in outcomes),
        "failed": sum(o.status == "failed" for o in outcomes),
    }


def latency_columns(seconds: list[float], scale: float = 1.0, unit: str = "s", digits: int = 3) -> dict:
    return {f"p{q}_{unit}": round(percentile(seconds, q) * scale, digits) for q in (50, 95, 99)}


# --- the stacks under test ---------------------------------------------------------------------------


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

    def call(
        self,
        session: requests.Session,
        data: bytes,
        request: dict,
        timeout: float,
        wait: bool = True,
        detach: bool = False,
    ) -> Outcome:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def session(self) -> requests.Session:
        return requests.Session()


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
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_SERVE_LOG_TO_STDERR": "0"}
        with (self.folder / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        assert self.process is not None, "start() first"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start (code {self.process.returncode}):\n{self.log()}")
            self.tree()
            try:
                with requests.Session() as session:
                    if self.call(session, probe_image(), {"model": TEXT_MODEL}, 30).status == "ok":
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


def probe_image() -> bytes:
    return (Path(Options().images) / PROBE_IMAGE).read_bytes()


def serve_command(module: str, *args: str) -> list[str]:
    """The command line of a peer's server process: ``main(args)`` of ``bench.peers.<module>``."""
    # Imported as bench.peers.<module>, not run as __main__: what a server pickles must name its module.
    return [
        sys.executable,
        "-c",
        f"import sys; from bench.peers.{module} import main; sys.exit(main(sys.argv[1:]))",
        *args,
    ]
