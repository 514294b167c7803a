"""Lanes, aging, the resource gate, deadlines, cancel, backpressure and time limits, with real workers."""

from __future__ import annotations

import io
import threading
import time

from PIL import Image

from tests.conftest import image_bytes
from tests.integration.helpers import small_png, status, submit, wait_for
from tests.support.slow_models import STUCK, slow_manifest

CLOSED_GATE = {"MASKQ_GATE_RESERVE_MB": 10**9, "MASKQ_GATE_CHECK_S": 0.2}


def test_an_interactive_job_starts_before_every_batch_job_not_already_running(isolated):
    client = isolated.client()
    isolated.worker()
    batch = [submit(client, small_png(i), {"lane": "batch"}).get_json()["id"] for i in range(200)]
    interactive = submit(client, small_png(999), {"lane": "interactive"}).get_json()["id"]
    assert client.get(f"/v1/jobs/{interactive}?wait=30").get_json()["status"] == "succeeded"
    jobs = isolated.jobs()
    chosen = jobs.get(interactive)
    overtaking = sorted(
        (r.started_at, job_id)
        for job_id in batch
        if (r := jobs.get(job_id)).started_at and chosen.created_at < r.started_at < chosen.started_at
    )
    # One worker process runs one job at a time, and takes the next message only when its job ends:
    # at most the one batch job already taken off the broker as the interactive job arrived (its
    # record says "started" a few milliseconds after the worker took it) may start in between.
    assert len(overtaking) <= 1, overtaking
    waiting = [job_id for job_id in batch if jobs.get(job_id).status == "queued"]
    assert len(waiting) > 100  # the batch lane was still deep when the interactive job went


def test_a_queued_job_reports_its_position_and_an_estimated_start(isolated):
    client = isolated.client()
    ids = [
        submit(client, small_png(i), {"lane": lane}).get_json()["id"]
        for i, lane in enumerate(["batch", "batch", "default", "interactive"])
    ]
    positions = [client.get(f"/v1/jobs/{job_id}").get_json()["queue_position"] for job_id in ids]
    # interactive first, then default, then batch in arrival order.
    assert positions == [2, 3, 1, 0]
    assert client.get(f"/v1/jobs/{ids[0]}").get_json()["estimated_start_at"].endswith("Z")


def test_a_batch_job_still_runs_within_the_aging_bound_under_a_steady_interactive_stream(isolated):
    aging_s = 2.0
    client = isolated.client()
    isolated.worker(MASKQ_LANE_AGING_S=aging_s, MASKQ_SCHEDULER_TICK_S=0.2)
    stop = threading.Event()
    stream_client = isolated.client()

    def stream():
        n = 0
        while not stop.is_set():
            if isolated.redis.zcard("maskq:lane:interactive") < 3:
                submit(stream_client, small_png(n), {"lane": "interactive"})
                n += 1
            time.sleep(0.02)

    feeder = threading.Thread(target=stream, daemon=True)
    feeder.start()
    try:
        wait_for(lambda: isolated.redis.zcard("maskq:lane:interactive") >= 2, 10)
        batch_id = submit(client, small_png(12345), {"lane": "batch"}).get_json()["id"]
        job = client.get(f"/v1/jobs/{batch_id}?wait=30").get_json()
        interactive_waiting = isolated.redis.zcard("maskq:lane:interactive")
    finally:
        stop.set()
        feeder.join()
    assert job["status"] == "succeeded"
    record = isolated.jobs().get(batch_id)
    assert record.lane == "interactive"  # promoted by aging
    mean = isolated.jobs().mean_duration()
    waited = record.started_at - record.created_at
    # The age, then at most the interactive jobs already queued (< 3) plus the one running.
    assert waited <= aging_s + 4 * mean + 1.5, (waited, mean)
    assert interactive_waiting >= 1  # the stream never let the interactive lane run dry


def test_a_closed_gate_takes_nothing_and_lowering_the_reserve_at_run_time_opens_it(isolated):
    client = isolated.client()
    isolated.worker(**CLOSED_GATE)
    job_id = submit(client, small_png()).get_json()["id"]
    time.sleep(2)
    assert client.get(f"/v1/jobs/{job_id}").get_json()["status"] == "queued"
    gates = client.get("/v1/models").get_json()["gates"]
    assert [g["open"] for g in gates.values()] == [False]
    isolated.redis.set("maskq:gate:reserve_mb", 0)
    assert client.get(f"/v1/jobs/{job_id}?wait=20").get_json()["status"] == "succeeded"
    assert [g["open"] for g in client.get("/v1/models").get_json()["gates"].values()] == [True]
    # Reopened, the worker polls its queues in the order it started with: the lanes first, webhooks last.
    from config.celery import create_celery

    inspect = create_celery(isolated.settings()).control.inspect(timeout=5)
    queues = wait_for(lambda: inspect.active_queues(), 20)
    assert [[q["name"] for q in qs] for qs in queues.values()] == [["interactive", "default", "batch", "webhooks"]]


def test_a_job_whose_deadline_passes_while_queued_expires_and_never_runs(isolated):
    client = isolated.client()
    isolated.worker(**CLOSED_GATE, MASKQ_SCHEDULER_TICK_S=0.2)
    job_id = submit(client, small_png(), {"deadline_s": 1}).get_json()["id"]
    jobs = isolated.jobs()
    # The worker's upkeep expires it without anyone reading it.
    wait_for(lambda: status(jobs, job_id) == "expired", 5)
    isolated.redis.set("maskq:gate:reserve_mb", 0)
    later = submit(client, small_png(1)).get_json()["id"]
    assert client.get(f"/v1/jobs/{later}?wait=20").get_json()["status"] == "succeeded"
    job = client.get(f"/v1/jobs/{job_id}").get_json()
    assert job["status"] == "expired" and job["started_at"] is None
    assert job["error"]["code"] == "deadline"


def test_a_deadline_is_enforced_on_read_even_with_no_worker_at_all(isolated):
    client = isolated.client()
    job_id = submit(client, small_png(), {"deadline_s": 0.5}).get_json()["id"]
    time.sleep(0.7)
    assert client.get(f"/v1/jobs/{job_id}").get_json()["status"] == "expired"


def test_a_job_canceled_while_queued_never_runs(isolated):
    client = isolated.client()
    isolated.worker(**CLOSED_GATE)
    job_id = submit(client, small_png()).get_json()["id"]
    answer = client.delete(f"/v1/jobs/{job_id}")
    assert answer.status_code == 200 and answer.get_json()["status"] == "canceled"
    isolated.redis.set("maskq:gate:reserve_mb", 0)
    later = submit(client, small_png(1)).get_json()["id"]
    assert client.get(f"/v1/jobs/{later}?wait=20").get_json()["status"] == "succeeded"
    job = client.get(f"/v1/jobs/{job_id}").get_json()
    assert job["status"] == "canceled" and job["started_at"] is None


def test_a_job_canceled_while_running_ends_canceled_and_its_result_is_discarded(isolated, tmp_path):
    client = isolated.client()
    isolated.worker(MASKQ_MODELS_MANIFEST=slow_manifest(tmp_path, delay_s=2))
    job_id = submit(client, image_bytes("en.jpg"), {"outputs": ["rle", "png"]}).get_json()["id"]
    jobs = isolated.jobs()
    wait_for(lambda: status(jobs, job_id) == "running", 20)
    assert client.delete(f"/v1/jobs/{job_id}").get_json()["status"] == "canceled"
    later = submit(client, small_png()).get_json()["id"]  # runs after the canceled one is over
    assert client.get(f"/v1/jobs/{later}?wait=30").get_json()["status"] == "succeeded"
    assert status(jobs, job_id) == "canceled"
    from storage.local import LocalStorage

    left = LocalStorage(isolated.env["MASKQ_STORAGE_DIR"]).list(f"tenants/default/jobs/{job_id}/")
    assert left == [f"tenants/default/jobs/{job_id}/input.jpg"]


def test_canceling_an_ended_job_is_a_409(isolated):
    client = isolated.client()
    isolated.worker()
    job_id = submit(client, small_png()).get_json()["id"]
    assert client.get(f"/v1/jobs/{job_id}?wait=20").get_json()["status"] == "succeeded"
    answer = client.delete(f"/v1/jobs/{job_id}")
    assert answer.status_code == 409 and answer.mimetype == "application/problem+json"
    assert client.delete("/v1/jobs/" + "a" * 32).status_code == 404


def test_a_full_lane_answers_503_with_retry_after_and_stores_nothing(isolated):
    client = isolated.client(lane_max_depth={"batch": 2})
    for i in range(2):
        assert submit(client, small_png(i), {"lane": "batch"}).status_code == 202
    answer = submit(client, small_png(3), {"lane": "batch"})
    assert answer.status_code == 503 and answer.mimetype == "application/problem+json"
    assert int(answer.headers["Retry-After"]) >= 1
    assert len(list(isolated.redis.scan_iter(match="maskq:job:*"))) == 2
    assert submit(client, small_png(4), {"lane": "default"}).status_code == 202  # other lanes are open


def test_a_job_over_its_soft_time_limit_fails_with_timeout_and_the_worker_carries_on(isolated, tmp_path):
    limits = {"job_soft_time_limit_s": 1, "job_hard_time_limit_s": 4, "storage_retry_bound_s": 0.5}
    isolated.worker(MASKQ_MODELS_MANIFEST=slow_manifest(tmp_path, delay_s=3))
    job_id = submit(isolated.client(**limits), small_png()).get_json()["id"]
    client = isolated.client()
    job = client.get(f"/v1/jobs/{job_id}?wait=20").get_json()
    assert job["status"] == "failed" and job["error"]["code"] == "timeout"
    later = submit(client, small_png(1)).get_json()["id"]
    assert client.get(f"/v1/jobs/{later}?wait=30").get_json()["status"] == "succeeded"


def test_a_job_killed_at_its_hard_time_limit_fails_with_timeout_and_the_worker_carries_on(isolated):
    # A large image keeps ONNX Runtime busy in C code past both limits: the soft
    # limit's exception cannot interrupt it, so the hard limit kills the pool process.
    big = io.BytesIO()
    Image.open(io.BytesIO(image_bytes("ch_en_num.jpg"))).resize((3000, 4000)).save(big, "JPEG")
    limits = {"job_soft_time_limit_s": 0.3, "job_hard_time_limit_s": 0.6, "storage_retry_bound_s": 0.1}
    worker = isolated.worker()
    before = set(worker.children())
    job_id = submit(isolated.client(**limits), big.getvalue()).get_json()["id"]
    client = isolated.client()
    job = client.get(f"/v1/jobs/{job_id}?wait=30").get_json()
    assert job["status"] == "failed" and job["error"]["code"] == "timeout"
    later = submit(client, small_png()).get_json()["id"]
    assert client.get(f"/v1/jobs/{later}?wait=30").get_json()["status"] == "succeeded"
    assert worker.alive
    if "Hard time limit" in worker.log():
        assert set(worker.children()) != before  # the killed pool process was replaced


def test_a_job_deaf_to_its_soft_limit_is_killed_at_the_hard_one_and_failed_by_the_main_process(isolated, tmp_path):
    """The pool process is killed; the worker's main process fails the job, fenced by the killed process
    (tasks/run_job.py): the job failing at all shows the fence named the run that held it."""
    limits = {"job_soft_time_limit_s": 0.5, "job_hard_time_limit_s": 1.5, "storage_retry_bound_s": 0.1}
    worker = isolated.worker(MASKQ_MODELS_MANIFEST=slow_manifest(tmp_path, delay_s=6, adapter=STUCK))
    before = set(worker.children())
    job_id = submit(isolated.client(**limits), small_png()).get_json()["id"]
    job = isolated.client().get(f"/v1/jobs/{job_id}?wait=30").get_json()
    assert job["status"] == "failed" and job["error"]["code"] == "timeout", job
    assert "hard time limit" in job["error"]["message"]
    log = worker.log()
    assert "Hard time limit (1.5s) exceeded" in log and f"job {job_id}: killed at its hard time limit" in log
    wait_for(lambda: set(worker.children()) - before, 30)  # the killed pool process was replaced
    assert worker.alive


def test_an_out_of_memory_error_puts_the_job_back_then_fails_it_with_code_resources(isolated, tmp_path):
    manifest = tmp_path / "models.toml"
    manifest.write_text(
        'default = "text-regions"\n'
        '[models.text-regions]\nversion = "1"\nadapter = "models.adapters.text_regions:TextRegionsAdapter"\n'
        '[models.memory-hog]\nversion = "1"\nadapter = "tests.support.memory_hog:MemoryHogAdapter"\n'
    )
    isolated.worker(MASKQ_MODELS_MANIFEST=manifest, MASKQ_OOM_RETRIES=2, MASKQ_OOM_RETRY_DELAY_S=0.3)
    client = isolated.client(models_manifest=manifest)
    pubsub = isolated.redis.pubsub()
    answer = submit(client, small_png(), {"model": "memory-hog"}).get_json()
    pubsub.subscribe(f"maskq:job:{answer['id']}:events")
    job = client.get(f"/v1/jobs/{answer['id']}?wait=30").get_json()
    assert job["status"] == "failed" and job["error"]["code"] == "resources"
    assert isolated.jobs().get(answer["id"]).attempts == 3  # the first run and two retries
    seen = []
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        if message["type"] == "message":
            seen.append(message["data"].decode())
    assert "queued" in seen  # it was put back, not failed at once


def test_aging_promotes_a_trickle_not_the_whole_backlog(isolated):
    """A deep, old batch lane must not flood the interactive lane: one promoted job waits there at a time."""
    from stores.lanes import Lanes

    client = isolated.client()
    ids = [submit(client, small_png(i), {"lane": "batch"}).get_json()["id"] for i in range(5)]
    lanes = Lanes(isolated.redis, isolated.jobs(), isolated.settings(lane_aging_s=60))
    later = time.time() + 3600  # as if they had all waited an hour
    assert lanes.promote_aged(now=later) == [ids[0]]  # the oldest first
    assert lanes.promote_aged(now=later) == []  # it still waits in the interactive lane
    assert isolated.redis.llen("interactive") == 1 and isolated.redis.llen("batch") == 4
    assert client.get(f"/v1/jobs/{ids[0]}").get_json()["queue_position"] == 0
    client.delete(f"/v1/jobs/{ids[0]}")  # once it leaves the queue, the next one may go
    assert lanes.promote_aged(now=later) == [ids[1]]
    assert lanes.depths() == {"interactive": 1, "default": 0, "batch": 3}
    isolated.redis.delete(f"maskq:job:{ids[1]}")  # its record expired while it waited promoted
    assert lanes.promote_aged(now=later) == [ids[2]]  # aging goes on: the stale entry holds no place
