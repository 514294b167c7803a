"""The client host's side: submit, poll and cancel jobs against the cluster's web, recording every answer.

``python -m tests.cluster.load --base-url U --key K --webhook-url W --history H.jsonl load --seconds S``
runs client threads that submit a mix of jobs (the default and interactive
lanes, with and without a webhook, some canceled at once) and poll each once;
``… settle --timeout S`` reads the accepted jobs from the history and polls
each until it has ended, then reads every ended job once more (its result
must not have changed). Every request and its answer is one JSON line in the
history (``tests/cluster/history.py`` reads them). It runs inside the
``client`` namespace, where only the test hosts can be reached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
IMAGES = [ROOT / "tests" / "data" / "images" / n for n in ("en.jpg", "img_exif_orientation.jpg", "latin.jpg")]
EVENTS = ["job.succeeded", "job.failed", "job.canceled", "job.expired"]
ENDED = {"succeeded", "failed", "canceled", "expired"}
KINDS = (("default", 45), ("interactive", 15), ("webhook", 30), ("cancel", 10))


def digest(result: object) -> str | None:
    """A job's result without its presigned URLs (they change with every read), hashed."""
    if result is None:
        return None

    def strip(value: object) -> object:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not k.endswith("_url")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return hashlib.sha256(json.dumps(strip(result), sort_keys=True).encode()).hexdigest()[:16]


class History:
    """The history file: one JSON object per line, written under a lock."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()

    def add(self, kind: str, **fields: object) -> None:
        with self.lock, self.path.open("a") as out:
            out.write(json.dumps({"t": time.time(), "kind": kind, **fields}) + "\n")


class Client:
    def __init__(self, base_url: str, key: str, webhook_url: str, history: History):
        self.base_url = base_url
        self.webhook_url = webhook_url
        self.history = history
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key}"

    def submit(self, kind: str, image: Path) -> str | None:
        request: dict = {"lane": "interactive" if kind == "interactive" else "default"}
        if kind == "webhook":
            request["webhook"] = {"url": self.webhook_url, "events": EVENTS}
        files = {"image": (image.name, image.read_bytes(), "image/jpeg"), "request": (None, json.dumps(request))}
        try:
            answer = self.session.post(f"{self.base_url}/v1/jobs", files=files, timeout=15)
        except requests.RequestException as exc:
            self.history.add("submit", job=None, http=None, error=type(exc).__name__, job_kind=kind)
            return None
        job = answer.json().get("id") if answer.status_code in (200, 202) else None
        self.history.add(
            "submit",
            job=job,
            http=answer.status_code,
            job_kind=kind,
            webhook=kind == "webhook",
            retry_after="Retry-After" in answer.headers,
        )
        return job

    def poll(self, job_id: str, phase: str) -> str | None:
        try:
            answer = self.session.get(f"{self.base_url}/v1/jobs/{job_id}", timeout=15)
        except requests.RequestException as exc:
            self.history.add("poll", job=job_id, http=None, error=type(exc).__name__, phase=phase)
            return None
        body = answer.json() if answer.headers.get("content-type", "").endswith("json") else {}
        status = body.get("status") if answer.status_code == 200 else None
        self.history.add(
            "poll",
            job=job_id,
            http=answer.status_code,
            phase=phase,
            status=status,
            error_code=(body.get("error") or {}).get("code"),
            error_message=(body.get("error") or {}).get("message"),
            result=digest(body.get("result")) if status == "succeeded" else None,
        )
        return status

    def cancel(self, job_id: str) -> None:
        try:
            answer = self.session.delete(f"{self.base_url}/v1/jobs/{job_id}", timeout=15)
            self.history.add("cancel", job=job_id, http=answer.status_code)
        except requests.RequestException as exc:
            self.history.add("cancel", job=job_id, http=None, error=type(exc).__name__)


def run_load(client_args: tuple, seconds: float, clients: int, pause_s: float, kinds: list[str] | None = None) -> None:
    stop = time.monotonic() + seconds
    mix = [(k, w) for k, w in KINDS if not kinds or k in kinds]

    def one(number: int) -> None:
        client = Client(*client_args)
        rng = random.Random(number)
        while time.monotonic() < stop:
            kind = rng.choices([k for k, _ in mix], [w for _, w in mix])[0]
            job = client.submit(kind, rng.choice(IMAGES))
            if job and kind == "cancel":
                client.cancel(job)
            elif job:
                client.poll(job, "load")
            time.sleep(rng.uniform(0.5, 1.5) * pause_s)

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def settle(client_args: tuple, history_path: Path, timeout: float) -> None:
    """Poll every accepted job until it ended (or ``timeout``), then read each ended job once more."""
    client = Client(*client_args)
    accepted = [
        e["job"] for e in map(json.loads, history_path.read_text().splitlines()) if e["kind"] == "submit" and e["job"]
    ]
    pending = list(dict.fromkeys(accepted))
    deadline = time.monotonic() + timeout
    ended: list[str] = []
    while pending and time.monotonic() < deadline:
        still = []
        for job_id in pending:
            (ended if client.poll(job_id, "settle") in ENDED else still).append(job_id)
        pending = still
        if pending:
            time.sleep(1)
    for job_id in ended:
        client.poll(job_id, "final")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--webhook-url", required=True)
    parser.add_argument("--history", type=Path, required=True)
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("load")
    load.add_argument("--seconds", type=float, required=True)
    load.add_argument("--clients", type=int, default=2)
    load.add_argument("--pause-s", type=float, default=1.0)
    load.add_argument("--kinds", nargs="*", choices=[k for k, _ in KINDS], help="only these kinds of job")
    one = commands.add_parser("settle")
    one.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args()
    history = History(args.history)
    client_args = (args.base_url, args.key, args.webhook_url, history)
    if args.command == "load":
        run_load(client_args, args.seconds, args.clients, args.pause_s, args.kinds)
    else:
        settle(client_args, args.history, args.timeout)


if __name__ == "__main__":
    main()
