"""OpenTelemetry, when installed (requirements-otel.txt) and OTEL_EXPORTER_OTLP_ENDPOINT is set: the web's
request span and the worker's task span reach a real OTLP/HTTP receiver with the job's trace id."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import ROOT, free_port, require
from tests.integration.test_logs import TRACE_ID, TRACEPARENT

WEB = """
import io, json
from config.settings import load_settings
from runtime import telemetry
from stores.tenants import KeyStore
from webapp.app import create_app
from webapp.services import services
from tests.integration.helpers import small_png

app = create_app(load_settings())
with app.app_context():
    key, _ = KeyStore(services().redis).create("default")
answer = app.test_client().post("/v1/jobs", headers={"Authorization": f"Bearer {key}", "traceparent": TRACEPARENT},
                                data={"image": (io.BytesIO(small_png(9)), "a.png")}, content_type="multipart/form-data")
print(json.dumps(answer.get_json()))
telemetry.flush()
"""


def otel_installed() -> bool:
    try:
        import opentelemetry.instrumentation.celery
        import opentelemetry.instrumentation.flask
        import opentelemetry.proto.collector.trace.v1.trace_service_pb2  # noqa: F401
    except ImportError:
        return False
    return True


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on loopback: keeps every span it is sent, with its service's name."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list[tuple[str, str, str]] = []  # (service.name, trace id hex, span name)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource_spans in request.resource_spans:
                    service = next(
                        (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"),
                        "",
                    )
                    for scope in resource_spans.scope_spans:
                        receiver.spans += [(service, s.trace_id.hex(), s.name) for s in scope.spans]
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.shutdown()


@pytest.fixture
def receiver():
    require(otel_installed(), "OpenTelemetry (requirements-otel.txt)")
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


def test_the_web_and_the_worker_send_spans_of_the_jobs_trace(isolated, receiver):
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    isolated.worker(**otel)
    web = subprocess.run(
        [sys.executable, "-c", f"TRACEPARENT = {TRACEPARENT!r}\n" + WEB],
        cwd=ROOT,
        env={**os.environ, **isolated.env, **otel, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert web.returncode == 0, web.stderr[-3000:]
    job_id = __import__("json").loads(web.stdout.strip().splitlines()[-1])["id"]
    client = isolated.client()
    assert client.get(f"/v1/jobs/{job_id}?wait=30").get_json()["status"] == "succeeded"
    deadline = time.monotonic() + 20
    while not {"maskq-web", "maskq-worker"} <= {
        service for service, trace_id, _ in receiver.spans if trace_id == TRACE_ID
    }:
        assert time.monotonic() < deadline, receiver.spans
        time.sleep(0.1)
    names = {(service, name) for service, trace_id, name in receiver.spans if trace_id == TRACE_ID}
    assert ("maskq-web", "POST /v1/jobs") in names, names
    assert any(service == "maskq-worker" and "maskq.run_job" in name for service, name in names), names


def test_without_the_endpoint_nothing_is_traced(isolated):
    """The default: no OTEL_EXPORTER_OTLP_ENDPOINT, no tracer provider set up, no span anywhere."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from runtime import telemetry\n"
            "from webapp.app import create_app\nfrom config.settings import load_settings\n"
            "create_app(load_settings())\nprint(telemetry._started)",
        ],
        cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **isolated.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
