"""``Cancel-After`` on submit, as Replicate's API takes it: a job not ended in time is canceled, queued or running.

Real Redis, real workers; the running case uses the slow test adapter. Each
test would fail on a service that ignores the header (the job would run, or
wait, and the 4xx would be a 202).
"""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
from werkzeug.serving import make_server

from tests.conftest import image_bytes
from tests.integration.helpers import small_png, status, submit, wait_for
from tests.support.slow_models import slow_manifest

CLOSED_GATE = {"MASKQ_GATE_RESERVE_MB": 10**9, "MASKQ_GATE_CHECK_S": 0.2}
MIN_S = 5  # the shortest Cancel-After the service takes


def submit_with(client, image: bytes, cancel_after: str, request: dict | None = None):
    data = {"image": (io.BytesIO(image), "upload.png")}
    if request is not None:
        data["request"] = json.dumps(request)
    return client.post(
        "/v1/jobs", data=data, content_type="multipart/form-data", headers={"Cancel-After": cancel_after}
    )


def test_a_queued_job_past_its_cancel_after_is_canceled_by_worker_upkeep_with_its_own_code(isolated):
    client = isolated.client()
    answer = submit_with(client, small_png(), f"{MIN_S}s")
    assert answer.status_code == 202, answer.get_json()
    job = answer.get_json()
    assert job["cancel_at"].endswith("Z")
    jobs = isolated.jobs()
    record = jobs.get(job["id"])
    assert record.cancel_at == pytest.approx(record.created_at + MIN_S)
    # A worker that did not exist at submit enforces it: the deadline lives in Redis, not in a process.
    isolated.worker(**CLOSED_GATE, MASKQ_SCHEDULER_TICK_S=0.2)
    wait_for(lambda: status(jobs, job["id"]) == "canceled", MIN_S + 10)  # nobody reads it: upkeep did it
    record = jobs.get(job["id"])
    assert record.error["code"] == "cancel_after" and "before it started" in record.error["message"]
    assert record.started_at is None
    # The index does not keep it: the upkeep drops the entry just after the move (a separate command).
    wait_for(lambda: isolated.redis.zscore("maskq:cancel_at", job["id"]) is None, 5)
    isolated.redis.set("maskq:gate:reserve_mb", 0)
    later = submit(client, small_png(1)).get_json()["id"]
    assert client.get(f"/v1/jobs/{later}?wait=20").get_json()["status"] == "succeeded"
    assert jobs.get(job["id"]).started_at is None  # it never ran


def test_a_running_job_past_its_cancel_after_is_canceled_and_stays_canceled_when_its_worker_finishes(
    isolated, tmp_path
):
    client = isolated.client()
    isolated.worker(MASKQ_MODELS_MANIFEST=slow_manifest(tmp_path, delay_s=MIN_S + 4), MASKQ_SCHEDULER_TICK_S=0.2)
    job_id = submit_with(client, image_bytes("en.jpg"), f"{MIN_S}", {"outputs": ["rle", "png"]}).get_json()["id"]
    jobs = isolated.jobs()
    wait_for(lambda: status(jobs, job_id) == "running", 30)
    wait_for(lambda: status(jobs, job_id) == "canceled", MIN_S + 5)  # while the worker is still inside the model
    assert jobs.get(job_id).error["code"] == "cancel_after"
    assert "while it ran" in jobs.get(job_id).error["message"]
    later = submit(client, small_png()).get_json()["id"]  # runs once the canceled one has left the worker
    assert client.get(f"/v1/jobs/{later}?wait=30").get_json()["status"] == "succeeded"
    job = client.get(f"/v1/jobs/{job_id}").get_json()
    assert job["status"] == "canceled" and job["error"]["code"] == "cancel_after" and "result" not in job
    from storage.local import LocalStorage

    left = LocalStorage(isolated.env["MASKQ_STORAGE_DIR"]).list(f"tenants/default/jobs/{job_id}/")
    assert left == [f"tenants/default/jobs/{job_id}/input.jpg"]  # the worker's result was discarded


def test_a_job_that_ends_in_time_is_untouched(isolated):
    client = isolated.client()
    isolated.worker(MASKQ_SCHEDULER_TICK_S=0.2)
    job_id = submit_with(client, small_png(), f"{MIN_S}s").get_json()["id"]
    assert client.get(f"/v1/jobs/{job_id}?wait=20").get_json()["status"] == "succeeded"
    jobs = isolated.jobs()
    time.sleep(max(jobs.get(job_id).cancel_at - time.time(), 0) + 1)  # its time passes, upkeep ticks
    wait_for(lambda: isolated.redis.zscore("maskq:cancel_at", job_id) is None, 5)  # looked at, and let be
    job = client.get(f"/v1/jobs/{job_id}").get_json()
    assert job["status"] == "succeeded" and "error" not in job and job["result"]["instances"] is not None


def test_cancel_after_holds_on_read_with_no_worker_and_for_each_job_of_a_batch(isolated):
    client = isolated.client()
    job_id = submit_with(client, small_png(), "0h0m5s").get_json()["id"]
    batch = client.post(
        "/v1/batches",
        content_type="multipart/form-data",
        headers={"Cancel-After": "5"},
        data={"images": [(io.BytesIO(small_png(i)), f"{i}.png") for i in (1, 2)]},
    )
    assert batch.status_code == 202, batch.get_json()
    batch_jobs = [j["id"] for j in batch.get_json()["jobs"]]
    assert len(batch_jobs) == 2
    time.sleep(MIN_S + 0.3)
    for each in [job_id, *batch_jobs]:
        job = client.get(f"/v1/jobs/{each}").get_json()
        assert job["status"] == "canceled" and job["error"]["code"] == "cancel_after", job


@pytest.mark.parametrize(
    ("value", "status_code"),
    [
        ("soon", 400),
        ("", 400),
        ("5ms", 400),
        ("1m1h", 400),
        ("-5", 400),
        ("1e3", 400),
        ("9" * 40, 400),
        ("4s", 422),
        ("0", 422),
        ("24h1s", 422),
    ],
)
def test_a_bad_cancel_after_is_a_4xx_naming_the_header_and_stores_nothing(isolated, value, status_code):
    client = isolated.client()
    answer = submit_with(client, small_png(), value)
    assert answer.status_code == status_code, answer.get_json()
    assert answer.mimetype == "application/problem+json"
    assert [e["field"] for e in answer.get_json()["errors"]] == ["Cancel-After"]
    batch = client.post(
        "/v1/batches",
        content_type="multipart/form-data",
        headers={"Cancel-After": value},
        data={"images": [(io.BytesIO(small_png()), "a.png")]},
    )
    assert batch.status_code == status_code and "Cancel-After" in batch.get_json()["detail"]
    assert not list(isolated.redis.scan_iter(match="maskq:job:*"))
    assert not list(isolated.redis.scan_iter(match="maskq:batch:*"))


def test_the_python_client_sends_cancel_after_and_reads_its_refusal(isolated):
    from maskq.client import ApiError, Client
    from webapp.app import create_app

    app = create_app(isolated.settings())
    key = isolated.client().api_key
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="cancel-after-server", daemon=True)
    thread.start()
    try:
        client = Client(f"http://127.0.0.1:{server.server_port}", key, retries=0)
        job = client.submit(small_png(), cancel_after="1h30m")
        record = isolated.jobs().get(job.id)
        assert record.cancel_at == pytest.approx(record.created_at + 5400)
        assert job.document["cancel_at"].endswith("Z")
        record = isolated.jobs().get(client.submit(small_png(1), cancel_after=7.5).id)  # seconds as a number
        assert record.cancel_at == pytest.approx(record.created_at + 7.5)
        with pytest.raises(ApiError) as refused:
            client.submit(small_png(), cancel_after=1)
        assert refused.value.status == 422 and refused.value.errors[0]["field"] == "Cancel-After"
    finally:
        server.shutdown()
        thread.join(5)
