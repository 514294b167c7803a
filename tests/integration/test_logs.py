"""Logs that follow a job: one trace id through the web's and the worker's JSON lines and the webhook's headers."""

from __future__ import annotations

import io
import json
import logging

import pytest

from domain import trace
from runtime import logs
from tests.conftest import free_port
from tests.integration.helpers import small_png, submit
from tests.integration.webhook_receiver import Receiver

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
def web_lines():
    """The JSON lines this process (the web app under test) logs meanwhile."""
    stream = io.StringIO()
    handler = logs.handler("json", stream)
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(level)


def test_one_trace_id_follows_a_job_through_web_worker_and_webhook(isolated, tmp_path, web_lines):
    receiver = Receiver(free_port(), tmp_path).start()
    try:
        client = isolated.client()
        worker = isolated.worker(MASKQ_LOG_FORMAT="json")
        answer = client.post(
            "/v1/jobs",
            headers={"traceparent": TRACEPARENT},
            data={
                "image": (io.BytesIO(small_png(3)), "a.png"),
                "request": json.dumps({"webhook": {"url": receiver.url, "events": ["job.succeeded"]}}),
            },
            content_type="multipart/form-data",
        )
        assert answer.status_code == 202, answer.get_json()
        job_id = answer.get_json()["id"]
        job = client.get(f"/v1/jobs/{job_id}?wait=30").get_json()
        assert job["status"] == "succeeded" and job["traceparent"] == TRACEPARENT
        [delivery] = receiver.wait_for(1)
        assert delivery["headers"]["traceparent"] == TRACEPARENT
    finally:
        receiver.stop()

    about_job = {
        "job_id": job_id,
        "tenant": "default",
        "model": "text-regions",
        "lane": "default",
        "trace_id": TRACE_ID,
    }
    web = [line for line in web_lines() if line.get("job_id") == job_id]
    assert web and all(line.items() >= about_job.items() for line in web), web
    assert any("accepted" in line["message"] for line in web)
    worker_lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert worker_lines, worker.log()[-2000:]
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in worker_lines)
    job_lines = [line for line in worker_lines if line.get("job_id") == job_id]
    assert any("succeeded" in line["message"] for line in job_lines), job_lines
    assert any("delivered" in line["message"] for line in job_lines), job_lines  # the webhook's own line
    ours = [line for line in job_lines if not line["logger"].startswith("celery.")]
    assert all(line.items() >= about_job.items() for line in ours), ours
    # Every line that names the job carries it as a field, not only in its text (Celery's "received" and
    # "succeeded" lines too: their task id is the job's).
    assert all(line.get("job_id") == job_id for line in worker_lines if job_id in line["message"])


def test_a_job_without_a_trace_gets_one_and_a_malformed_one_is_replaced(isolated):
    client = isolated.client()
    made = submit(client, small_png(4)).get_json()["traceparent"]
    assert trace.parse(made) == made
    bad = client.post(
        "/v1/jobs",
        headers={"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"},
        data={"image": (io.BytesIO(small_png(5)), "a.png")},
        content_type="multipart/form-data",
    )
    assert bad.status_code == 202 and trace.trace_id(bad.get_json()["traceparent"]) != "0" * 32


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (TRACEPARENT, True),
        (TRACEPARENT.upper(), True),
        (" " + TRACEPARENT + " ", True),
        ("ff-" + TRACEPARENT[3:], False),
        (TRACEPARENT[:-1], False),
        ("00-" + TRACE_ID + "-" + "0" * 16 + "-01", False),
        ("", False),
        (None, False),
        ("not a trace", False),
    ],
)
def test_traceparent_parsing(header, ok):
    assert (trace.parse(header) == TRACEPARENT) is ok
