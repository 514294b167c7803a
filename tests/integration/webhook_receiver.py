"""A real HTTP webhook receiver process for the tests, scripted per test.

``python -m tests.integration.webhook_receiver --port P --plan plan.json --log received.jsonl``
answers the n-th request with ``plan["responses"][n]`` (then with
``plan["default"]``): a status and optional headers such as ``Retry-After``.
It reads the plan again at every request, and appends every request it got
(time, path, headers with lower-case names, body) to the log. Tests drive it through :class:`Receiver`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Receiver:
    """One receiver process on a loopback port; ``url`` is where webhooks should go."""

    def __init__(self, port: int, folder: Path, responses: list[dict] | None = None, default: dict | None = None):
        self.port = port
        self.folder = Path(folder)
        self.plan_path = self.folder / f"plan-{port}.json"
        self.log_path = self.folder / f"received-{port}.jsonl"
        self.process: subprocess.Popen | None = None
        self.plan(responses or [], default or {"status": 200})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/maskq"

    def plan(self, responses: list[dict], default: dict | None = None) -> None:
        self.plan_path.write_text(json.dumps({"responses": responses, "default": default or {"status": 200}}))

    def start(self, timeout: float = 10) -> Receiver:
        command = [
            sys.executable,
            "-m",
            "tests.integration.webhook_receiver",
            "--port",
            str(self.port),
            "--plan",
            str(self.plan_path),
            "--log",
            str(self.log_path),
        ]
        self.process = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the webhook receiver did not start on port {self.port}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(5)

    def received(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def wait_for(self, count: int, timeout: float = 30) -> list[dict]:
        """The requests received, once there are at least ``count`` (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.received()
            if len(got) >= count or time.monotonic() > deadline:
                assert len(got) >= count, f"the receiver got {len(got)} request(s), expected {count}"
                return got
            time.sleep(0.05)


def serve(port: int, plan_path: Path, log_path: Path, host: str = "127.0.0.1") -> None:
    lock = threading.Lock()
    seen = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                n = seen["n"]
                seen["n"] += 1
                plan = json.loads(plan_path.read_text())
                answer = plan["responses"][n] if n < len(plan["responses"]) else plan["default"]
                with log_path.open("a") as log:
                    log.write(
                        json.dumps(
                            {
                                "n": n,
                                "at": time.time(),
                                "path": self.path,
                                "headers": {k.lower(): v for k, v in self.headers.items()},
                                "body": body.decode("utf-8"),
                            }
                        )
                        + "\n"
                    )
            self.send_response(answer.get("status", 200))
            for name, value in answer.get("headers", {}).items():
                self.send_header(name, str(value))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    serve(args.port, args.plan, args.log, args.host)
