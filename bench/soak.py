"""The soak run: minutes of steady mixed load while faults strike on a schedule; no job may be lost.

``make soak`` (``python -m bench.soak --minutes 10``; ``python -m bench --only
soak`` runs it for ``MASKQ_SOAK_MINUTES``, 10) starts the whole service on
loopback: a Redis server (AOF on), an S3-compatible server (moto), the web
front end, two inference workers and a webhooks worker, as the Procfile runs
them, and a webhook receiver. Client threads submit a mix of jobs: all three
lanes, identical jobs (cache hits and coalescing), jobs with webhooks, jobs
canceled at once, jobs whose deadline passes while queued. Meanwhile, at
fixed fractions of the run:

- SIGKILL of a worker's pool process, every 45 s from 10 s on (as an out-of-memory kill);
- SIGKILL of a whole inference worker (a machine lost), started again 5 s later;
- Redis stopped cleanly and started again 3 s later, from its AOF;
- the S3 server stopped for 20 s;
- the webhook receiver down for a fifth of the run, up to 2 minutes;
- Redis SIGKILLed and started again (up to a second of writes lost).

Then it waits for every accepted job to end, as long as jobs keep ending, and checks: each ended (succeeded,
or failed / expired / canceled with a reason), none is stuck, none ran to a
result twice (the workers' logs), every webhook event a job asked for arrived
at least once, each under one ``webhook-id``, and no request got a 5xx other
than a 503 with ``Retry-After`` (what a submit gets while Redis or the store is
away, as documented). It prints the figures and exits non-zero on any loss.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import redis
import requests
from PIL import Image

from bench.common import ROOT, Options, format_table, free_port, procfile
from domain import keys
from runtime.embedded_redis import RedisServer
from stores.tenants import KeyStore

ENDED = {"succeeded", "failed", "canceled", "expired"}
EVENTS = ["job.succeeded", "job.failed", "job.canceled", "job.expired"]
KINDS = (
    ("default", 30),
    ("interactive", 15),
    ("batch", 15),
    ("webhook", 15),
    ("repeat", 10),
    ("cancel", 8),
    ("deadline", 7),
)
TEXT_MODELS = ROOT / "tests" / "support" / "text_models.toml"
BUCKET = "maskq-soak"


def noise_png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Tally:
    """What the clients saw and the faults did; one lock for all of it."""

    accepted: dict[str, str] = field(default_factory=dict)  # job id -> kind
    hooked: set[str] = field(default_factory=set)
    statuses: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  # 5xx other than 503 + Retry-After
    faults: Counter = field(default_factory=Counter)
    crashes: Counter = field(default_factory=Counter)  # processes that exited on their own and were restarted
    lock: threading.Lock = field(default_factory=threading.Lock)


class Soak:
    """The service, its peers and the load, in a temporary folder; ``run()`` returns the report."""

    def __init__(self, minutes: float, clients: int = 4, folder: Path | None = None, seed: int = 7):
        self.seconds = minutes * 60
        self.clients = clients
        self.folder = Path(folder or tempfile.mkdtemp(prefix="maskq-soak-"))
        self.random = random.Random(seed)
        self.tally = Tally()
        self.processes: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, str] = {}
        self.down: set[str] = set()  # processes a fault stopped on purpose (the supervisor leaves them)
        self.stop_load = threading.Event()
        self.stopping = threading.Event()

    # -- the stack ----------------------------------------------------------------------------

    def start(self) -> None:
        from tests.integration.s3_server import S3Server
        from tests.integration.webhook_receiver import Receiver

        self.redis = RedisServer(free_port(), self.folder / "redis").start()
        self.s3 = S3Server(free_port(), self.folder / "s3-journal.jsonl").start()
        self.s3.create_bucket(BUCKET)
        self.receiver = Receiver(free_port(), self.folder).start()
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MASKQ_")},
            **self.s3.env_for(BUCKET),
            "MASKQ_REDIS_URL": self.redis.url,
            "MASKQ_DATA_DIR": str(self.folder / "data"),
            "MASKQ_PORT": str(port),
            "MASKQ_MODELS_MANIFEST": str(TEXT_MODELS),
            "MASKQ_ORT_INTRA_OP_THREADS": "1",
            "MASKQ_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
            "MASKQ_WEBHOOK_RETRY_SCHEDULE_S": "1,2,4,8,15,30,30,30,30",
            "MASKQ_WEBHOOK_TIMEOUT_S": "3",
            "MASKQ_WORKER_HEARTBEAT_S": "1",
            "MASKQ_RECOVERY_CHECK_S": "1",
            "MASKQ_RECOVERY_GRACE_S": "5",
            "MASKQ_UNACKED_RESTORE_INTERVAL_S": "5",
            "MASKQ_VISIBILITY_TIMEOUT_S": "120",
            "MASKQ_JOB_SOFT_TIME_LIMIT_S": "40",
            "MASKQ_JOB_HARD_TIME_LIMIT_S": "60",
            "MASKQ_STORAGE_RETRY_BOUND_S": "35",
            "MASKQ_DEFAULT_RATE": "1000000/minute",
            "MASKQ_GLOBAL_RATE": "1000000/minute",
            "MASKQ_DEV_KEY": "false",
            "PYTHONPATH": str(ROOT),
        }
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        commands = procfile()
        self._spawn("web", commands["web"])
        for name in ("worker-a", "worker-b"):
            self._spawn(name, commands["worker"] + f" -n {name}@%h")
        self._spawn("webhooks", commands["webhooks"])
        key, _ = KeyStore(redis.Redis.from_url(self.redis.url)).create("soak", label="soak")
        self.headers = {"Authorization": f"Bearer {key}"}
        self._wait_ready()

    def _spawn(self, name: str, command: str) -> None:
        self.commands[name] = command
        with (self.folder / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                ["/bin/sh", "-c", command],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the soak's service was not ready in {timeout} s; logs in {self.folder}")

    def supervise(self) -> None:
        """Start again a process that exited on its own, as compose's restart policy or Kubernetes would."""
        while not self.stopping.wait(1):
            for name, process in list(self.processes.items()):
                if process.poll() is not None and name not in self.down and not self.stopping.is_set():
                    with self.tally.lock:
                        self.tally.crashes[name] += 1
                    print(
                        f"soak: {time.strftime('%H:%M:%S')} {name} exited (code {process.returncode}); started again",
                        flush=True,
                    )
                    self._spawn(name, self.commands[name])

    def stop(self) -> None:
        self.stopping.set()
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        self.receiver.stop()
        self.s3.kill()
        self.redis.stop()

    # -- the load -----------------------------------------------------------------------------

    def client(self, number: int) -> None:
        session = requests.Session()
        session.headers.update(self.headers)
        rng = random.Random(number)
        seed = number * 1_000_000
        while not self.stop_load.is_set():
            kind = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
            seed += 1
            request: dict = {"lane": {"interactive": "interactive", "batch": "batch"}.get(kind, "default")}
            image = noise_png(7 if kind == "repeat" else seed)  # identical bytes and request: cache hits
            if kind == "webhook":
                request["webhook"] = {"url": self.receiver.url, "events": EVENTS}
            if kind == "deadline":
                request.update(lane="batch", deadline_s=1)
            try:
                files: dict[str, tuple[str | None, bytes | str, str]] = {
                    "image": ("noise.png", image, "image/png"),
                    "request": (None, json.dumps(request), "application/json"),
                }
                answer = session.post(f"{self.base_url}/v1/jobs", timeout=30, files=files)
            except requests.RequestException as exc:
                self._count("connection error", f"submit: {exc}")
                time.sleep(0.5)
                continue
            self._answered("submit", answer)
            if answer.status_code in (200, 202):
                job_id = answer.json()["id"]
                with self.tally.lock:
                    self.tally.accepted[job_id] = kind
                    if kind == "webhook":
                        self.tally.hooked.add(job_id)
                if kind == "cancel":
                    try:
                        self._answered("cancel", session.delete(f"{self.base_url}/v1/jobs/{job_id}", timeout=30))
                    except requests.RequestException as exc:
                        self._count("connection error", f"cancel: {exc}")
            elif answer.status_code == 503:
                time.sleep(min(float(answer.headers.get("Retry-After", 1)), 2))
            time.sleep(rng.uniform(0.1, 0.5))

    def _answered(self, what: str, answer: requests.Response) -> None:
        status = answer.status_code
        refused = status == 503 and "Retry-After" in answer.headers
        self._count(f"{what} {status}", None if status < 500 or refused else f"{what}: {status} {answer.text[:200]}")

    def _count(self, key: str, error: str | None) -> None:
        with self.tally.lock:
            self.tally.statuses[key] += 1
            if error:
                self.tally.server_errors.append(error)

    # -- the faults ---------------------------------------------------------------------------

    def faults(self) -> None:
        plan = sorted(
            [
                (0.25, self.kill_worker),
                (0.40, self.restart_redis_cleanly),
                (0.55, self.stop_s3),
                (0.65, self.stop_receiver),
                (0.80, self.crash_redis),
            ],
            key=lambda p: p[0],
        )
        # From 10 s on, so that no pool kill falls on the whole worker's kill (at a quarter: 15 s in a 1-minute soak).
        plan += [(t / self.seconds, self.kill_pool_process) for t in np.arange(10, self.seconds - 5, 45)]
        plan.sort(key=lambda p: p[0])
        started = time.monotonic()
        threads = []
        for fraction, fault in plan:
            if self.stop_load.wait(max(0.0, started + fraction * self.seconds - time.monotonic())):
                break
            thread = threading.Thread(target=fault, name=fault.__name__, daemon=True)  # some last a while
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()

    def _fault(self, kind: str) -> None:
        with self.tally.lock:
            self.tally.faults[kind] += 1
        print(f"soak: {time.strftime('%H:%M:%S')} {kind}", flush=True)

    def kill_pool_process(self) -> None:
        """SIGKILL one pool process of a worker that is up (waiting a little for one, if both are restarting)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not self.stopping.is_set():
            names = [n for n in ("worker-a", "worker-b") if n not in self.down]
            name = self.random.choice(names) if names else None
            try:
                pool = psutil.Process(self.processes[name].pid).children() if name else []  # its pool processes
            except psutil.NoSuchProcess:
                pool = []
            if pool:
                self._fault("SIGKILL of a pool process")
                os.kill(self.random.choice(pool).pid, signal.SIGKILL)
                return
            time.sleep(0.5)

    def kill_worker(self) -> None:
        self._fault("SIGKILL of a whole worker")
        self.down.add("worker-b")
        os.killpg(self.processes["worker-b"].pid, signal.SIGKILL)
        self.processes["worker-b"].wait()
        time.sleep(5)
        self._spawn("worker-b", procfile()["worker"] + " -n worker-b@%h")
        self.down.discard("worker-b")

    def restart_redis_cleanly(self) -> None:
        self._fault("Redis stopped and started again")
        self.redis.stop()
        time.sleep(3)
        self.redis.start()

    def crash_redis(self) -> None:
        self._fault("Redis SIGKILLed and started again")
        self.redis.kill()
        time.sleep(2)
        self.redis.start()

    def stop_s3(self) -> None:
        self._fault("S3 server down for 20 s")
        self.s3.kill()
        time.sleep(20)
        self.s3.start()

    def stop_receiver(self) -> None:
        down = min(120.0, self.seconds / 5)
        self._fault(f"webhook receiver down for {down:.0f} s")
        self.receiver.stop()
        time.sleep(down)
        self.receiver.start()

    # -- the end ------------------------------------------------------------------------------

    def run(self, drain_s: float = 120) -> dict:
        self.start()
        try:
            clients = [threading.Thread(target=self.client, args=(n,), daemon=True) for n in range(self.clients)]
            for thread in clients:
                thread.start()
            faults = threading.Thread(target=self.faults, daemon=True)
            faults.start()
            threading.Thread(target=self.supervise, daemon=True).start()
            time.sleep(self.seconds)
            self.stop_load.set()
            for thread in clients:
                thread.join(60)
            faults.join(180)
            return self.check(drain_s)
        finally:
            self.stop()

    def check(self, drain_s: float) -> dict:
        client = redis.Redis.from_url(self.redis.url)
        accepted = dict(self.tally.accepted)
        # The backlog drains at the workers' pace: wait while jobs keep ending, up to 30 minutes. A job is
        # stuck only if it has not ended once nothing has ended for drain_s.
        progress_at, ended_before, cap = time.monotonic(), -1, time.monotonic() + 1800
        while True:
            states = self._states(client, accepted)
            ended = sum(s in ENDED for s in states.values())
            if ended != ended_before:
                progress_at, ended_before = time.monotonic(), ended
            if ended == len(states) or time.monotonic() - progress_at > drain_s or time.monotonic() > cap:
                break
            time.sleep(1)
        expected = {(job_id, f"job.{states[job_id]}") for job_id in self.tally.hooked if states.get(job_id) in ENDED}
        deadline = time.monotonic() + min(drain_s, 180)
        while True:
            received = defaultdict(set)  # (job id, event) -> webhook-ids
            for request in self.receiver.received():
                body = json.loads(request["body"]) if request.get("body") else {}
                received[(body.get("id"), request["headers"].get("maskq-event"))].add(request["headers"]["webhook-id"])
            missing = expected - set(received)
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(1)
        runs: Counter[str] = Counter()
        for log in self.folder.glob("worker-*.log"):
            for line in log.read_text(errors="replace").splitlines():
                if ": succeeded with " in line and "job " in line:
                    runs[line.split("job ", 1)[1].split(":", 1)[0]] += 1
        by_status = Counter(states.values())
        report = {
            "minutes": round(self.seconds / 60, 1),
            "jobs accepted": len(accepted),
            "by status": dict(by_status),
            "lost (no record)": sorted(j for j, s in states.items() if s is None),
            "stuck (not ended)": sorted(j for j, s in states.items() if s is not None and s not in ENDED),
            "ran to a result twice": sorted(j for j, n in runs.items() if n > 1 and j in accepted),
            "webhook events expected": len(expected),
            "webhook events missing": sorted(f"{j} {e}" for j, e in missing),
            "webhook events under two ids": sorted(f"{j} {e}" for (j, e), ids in received.items() if len(ids) > 1),
            "5xx (other than 503 + Retry-After)": list(self.tally.server_errors),
            "answers": dict(self.tally.statuses),
            "faults": dict(self.tally.faults),
            "processes restarted after exiting on their own": dict(self.tally.crashes),
            "logs": str(self.folder),
        }
        report["clean"] = not any(
            report[k]
            for k in (
                "lost (no record)",
                "stuck (not ended)",
                "ran to a result twice",
                "webhook events missing",
                "webhook events under two ids",
                "5xx (other than 503 + Retry-After)",
            )
        )
        return report

    @staticmethod
    def _states(client: redis.Redis, accepted: dict[str, str]) -> dict[str, str | None]:
        ids = list(accepted)
        with client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(keys.job(job_id), "status")
            values = pipe.execute()
        return {job_id: v.decode() if v else None for job_id, v in zip(ids, values)}


def table(report: dict) -> list[dict]:
    rows = [
        {"figure": k, "value": len(v) if isinstance(v, list) else v}
        for k, v in report.items()
        if k not in ("answers", "faults", "by status", "logs", "processes restarted after exiting on their own")
    ]
    rows += [{"figure": f"fault: {k}", "value": v} for k, v in report["faults"].items()]
    rows += [
        {"figure": f"restarted after exiting on its own: {k}", "value": v}
        for k, v in report["processes restarted after exiting on their own"].items()
    ]
    rows += [{"figure": f"jobs {k}", "value": v} for k, v in report["by status"].items()]
    rows += [{"figure": f"answers: {k}", "value": v} for k, v in sorted(report["answers"].items())]
    return rows


def run(options: Options) -> list[dict]:
    minutes = float(os.environ.get("MASKQ_SOAK_MINUTES", "10"))
    report = Soak(minutes).run()
    if not report["clean"]:
        raise RuntimeError(f"the soak run lost or doubled work: {json.dumps(report, indent=1)}")
    return table(report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args(argv)
    report = Soak(args.minutes, args.clients).run()
    print(format_table(f"soak ({args.minutes:g} min)", table(report)))
    for key in (
        "lost (no record)",
        "stuck (not ended)",
        "ran to a result twice",
        "webhook events missing",
        "webhook events under two ids",
        "5xx (other than 503 + Retry-After)",
    ):
        if report[key]:
            print(f"{key}: {report[key][:20]}", file=sys.stderr)
    print(f"logs: {report['logs']}")
    return 0 if report["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
