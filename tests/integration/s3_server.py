"""A real S3-compatible server process for the tests: moto's S3 API, made durable across restarts.

moto keeps its buckets in memory, so a killed server comes back empty, which
no real store (S3, MinIO, Ceph) does. This launcher turns on moto's request
recorder (a journal of every request it served) and, when it starts again,
replays the journal's writes into the fresh in-memory backend *before* it
opens its port: clients see the store go away and come back with everything
it had acknowledged, exactly as after a MinIO restart.

Run it as ``python -m tests.integration.s3_server --port P --journal FILE``;
tests drive it through :class:`S3Server`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parents[2]
ACCESS_KEY = "testing"
SECRET_KEY = "testing-secret"
_WRITES = {"PUT", "POST", "DELETE"}
_UPLOAD_ID = re.compile(r"<UploadId>([^<]+)</UploadId>")


class S3Server:
    """One launcher process on a loopback port; ``kill()`` and ``start()`` again simulate an outage."""

    def __init__(self, port: int, journal: Path, env: dict[str, str] | None = None):
        self.port = port
        self.journal = Path(journal)
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self.log_path = self.journal.with_suffix(".log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> S3Server:
        command = [
            sys.executable,
            "-m",
            "tests.integration.s3_server",
            "--port",
            str(self.port),
            "--journal",
            str(self.journal),
        ]
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **self.env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the S3 server exited at start:\n{self.log_path.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the S3 server did not listen on {self.port} within {timeout}s") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the store vanishes mid-request, as a crashed server would."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def env_for(self, bucket: str) -> dict[str, str]:
        """The ``MASKQ_*`` variables that point maskq at ``bucket`` on this server."""
        return {
            "MASKQ_S3_BUCKET": bucket,
            "MASKQ_S3_ENDPOINT_URL": self.url,
            "MASKQ_S3_REGION": "us-east-1",
            "MASKQ_S3_ACCESS_KEY_ID": ACCESS_KEY,
            "MASKQ_S3_SECRET_ACCESS_KEY": SECRET_KEY,
            "MASKQ_S3_PATH_STYLE": "true",
            "MASKQ_S3_TIMEOUT_S": "2",
        }


def replay(app, journal: Path) -> int:
    """Send the journal's writes to ``app`` (a WSGI app) in order; return how many were replayed."""
    from werkzeug.test import Client

    client = Client(app)
    pending_upload: dict[str, str] = {}  # key path -> upload id the replayed CreateMultipartUpload got
    upload_ids: dict[str, str] = {}  # recorded upload id -> replayed one
    count = 0
    for line in journal.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # the last line of a journal whose server was killed mid-write
        if entry.get("method") not in _WRITES:
            continue
        parts = urlsplit(entry["url"])
        query = parse_qs(parts.query, keep_blank_values=True)
        old_id = (query.get("uploadId") or [None])[0]
        if old_id is not None:
            # Multipart: the recorded upload id is the old server's; use the one this server handed out.
            new_id = upload_ids.setdefault(old_id, pending_upload.get(parts.path, old_id))
            query["uploadId"] = [new_id]
        body = entry.get("body") or b""
        if entry.get("body_encoded"):
            body = base64.b64decode(body)
        headers = {
            k: v
            for k, v in entry["headers"].items()
            if k.lower() not in ("content-length", "transfer-encoding", "expect")
        }
        response = client.open(
            path=parts.path,
            base_url=f"{parts.scheme}://{parts.netloc}",
            method=entry["method"],
            query_string=dict(query.items()),
            headers=headers,
            data=body,
        )
        if entry["method"] == "POST" and "uploads" in query:
            match = _UPLOAD_ID.search(response.get_data(as_text=True))
            if match:
                pending_upload[parts.path] = match.group(1)
        count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--journal", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="where to listen (tests/cluster)")
    args = parser.parse_args()
    # The recorder reads these when moto is imported.
    os.environ["MOTO_ENABLE_RECORDING"] = "true"
    os.environ["MOTO_RECORDER_FILEPATH"] = str(args.journal)
    os.environ.setdefault("MOTO_PORT", str(args.port))
    from moto.moto_api import recorder
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    app = DomainDispatcherApplication(create_backend_app)
    if args.journal.exists():
        recorder.stop_recording()  # the replay is not new history
        replayed = replay(app, args.journal)
        recorder.start_recording()
        print(f"replayed {replayed} write(s) from {args.journal}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run_simple(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
