"""Recovery: a running job that no live worker process runs goes back to its lane and ends.

Each test builds the state a lost run leaves behind (a record ``running``,
started by a process that is gone or has moved on, its message in no lane or
stuck in the broker's ``unacked`` hash), then starts a real worker, whose lane
upkeep must find the job and run it to its end well within the broker's
visibility timeout (600 s here).
"""

from __future__ import annotations

import json
import time

import pytest

from domain import keys
from stores.fleet import live_workers
from tests.integration.helpers import small_png, submit, wait_for

LOST_TAG = "lost-delivery-tag"
FAST = {"MASKQ_RECOVERY_GRACE_S": 1, "MASKQ_RECOVERY_CHECK_S": 0.5, "MASKQ_VISIBILITY_TIMEOUT_S": 600}


def queued_job(isolated) -> tuple[str, bytes]:
    """A job submitted while no worker runs: ``(id, its message)``, the message taken off its lane."""
    client = isolated.client()
    job_id = submit(client, small_png(7), {"lane": "batch"}).get_json()["id"]
    message = isolated.redis.rpop("batch")
    assert message is not None and json.loads(message)["headers"]["id"] == job_id
    return job_id, message


def as_if_running(isolated, job_id: str, worker: str, attempts: int = 1) -> None:
    jobs = isolated.jobs()
    assert jobs.start(job_id, "pp-ocrv4-det+rec", worker=worker)
    isolated.redis.hset(keys.job(job_id), "attempts", attempts)
    assert isolated.redis.zscore(keys.RUNNING, job_id) is not None  # the start indexed it


def deliver_to_a_lost_worker(isolated, message: bytes) -> None:
    """Put the message in ``unacked`` as kombu does when it delivers one (and no one will acknowledge it)."""
    tag = LOST_TAG
    isolated.redis.hset(keys.BROKER_UNACKED, tag, json.dumps([json.loads(message), "batch", "batch"]))
    isolated.redis.zadd(keys.BROKER_UNACKED_INDEX, {tag: time.time()})


def wait_ended(isolated, job_id: str, timeout: float = 45):
    jobs = isolated.jobs()
    return wait_for(lambda: (r := jobs.get(job_id)).status.ended and r, timeout, interval=0.2)


@pytest.mark.parametrize("message_at", ["nowhere", "unacked"])
def test_a_running_job_of_a_process_that_is_gone_goes_back_and_succeeds(isolated, message_at):
    job_id, message = queued_job(isolated)
    as_if_running(isolated, job_id, worker="host-that-died:4242")
    if message_at == "unacked":
        deliver_to_a_lost_worker(isolated, message)
    started = time.monotonic()
    isolated.worker(**FAST)
    record = wait_ended(isolated, job_id)
    assert str(record.status) == "succeeded"
    assert time.monotonic() - started < 45  # not the visibility timeout
    assert record.last_error["code"] == "worker_lost" and record.attempts == 2
    assert record.worker != "host-that-died:4242"
    # The stuck delivery was moved, not copied (the worker's own delivery may not be acknowledged yet).
    assert not isolated.redis.hexists(keys.BROKER_UNACKED, LOST_TAG)
    assert isolated.redis.llen("batch") == 0 and not isolated.redis.zscore(keys.RUNNING, job_id)


def test_a_running_job_that_its_live_process_is_not_running_goes_back_and_succeeds(isolated):
    job_id, message = queued_job(isolated)
    worker = isolated.worker(**FAST)
    [beat] = [w for w in live_workers(isolated.redis) if int(w["id"].rsplit(":", 1)[1]) in worker.children()]
    assert beat["running"] == []
    # Its outcome was lost (Redis went away and did not come back in time): the process has moved on.
    as_if_running(isolated, job_id, worker=beat["id"])
    deliver_to_a_lost_worker(isolated, message)
    record = wait_ended(isolated, job_id)
    assert str(record.status) == "succeeded" and record.last_error["code"] == "worker_lost"


def test_a_job_whose_process_keeps_dying_fails_with_code_attempts(isolated):
    job_id, _ = queued_job(isolated)
    as_if_running(isolated, job_id, worker="host-that-died:4242", attempts=5)  # MASKQ_JOB_MAX_ATTEMPTS
    isolated.worker(**FAST)
    record = wait_ended(isolated, job_id)
    assert str(record.status) == "failed" and record.error["code"] == "attempts"
    assert "6 times" in record.error["message"]


def test_a_job_its_process_is_running_is_left_alone(isolated, tmp_path):
    from tests.support.slow_models import slow_manifest

    client = isolated.client()
    isolated.worker(MASKQ_MODELS_MANIFEST=slow_manifest(tmp_path, delay_s=6), **FAST)
    job_id = submit(client, small_png(3)).get_json()["id"]
    record = wait_ended(isolated, job_id, timeout=60)
    assert str(record.status) == "succeeded"
    assert record.attempts == 1 and record.last_error is None  # six seconds running, never taken for lost


def test_a_job_whose_record_no_longer_reads_fails_instead_of_staying_queued(isolated):
    client = isolated.client()
    job_id = submit(client, small_png(9)).get_json()["id"]
    isolated.redis.hset(keys.job(job_id), "created_at", "not a time")  # as a bad upgrade or a hand edit leaves it
    isolated.worker()
    wait_for(lambda: isolated.redis.hget(keys.job(job_id), "status") == b"failed", 30)
    error = json.loads(isolated.redis.hget(keys.job(job_id), "error"))
    assert error["code"] == "internal" and error["message"].startswith("the job could not be started")


def test_the_heartbeat_survives_an_error_in_what_it_reports(redis_client):
    from workers.heartbeat import Heartbeat

    calls = []

    def describe() -> dict:
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("a model's counters could not be read")
        return {"models": {}}

    heartbeat = Heartbeat(redis_client, 0.05, describe)
    heartbeat.start()
    try:
        wait_for(lambda: len(calls) >= 5, 5)  # it went on beating after the error
        assert live_workers(redis_client)
    finally:
        heartbeat.stop()


def test_polling_a_queued_job_and_the_health_routes_never_scan_the_keyspace(isolated):
    client = isolated.client()
    isolated.redis.set(keys.GATE_RESERVE_MB, 10**9)  # the gate stays closed: the job stays queued while we poll
    isolated.worker(MASKQ_RECOVERY_CHECK_S=0.2)
    job_id = submit(client, small_png(1), {"lane": "batch", "deadline_s": 600}).get_json()["id"]
    client.get(f"/v1/jobs/{job_id}")  # scripts loaded, connections made

    def scans() -> int:
        return int(isolated.redis.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))

    before = scans()
    for _ in range(5):
        job = client.get(f"/v1/jobs/{job_id}").get_json()
        assert job["status"] == "queued" and "estimated_start_at" in job
        client.get("/readyz")
        client.get("/metrics")
        client.get("/v1/models")
    time.sleep(1)  # the worker's own upkeep (gate, recovery) runs meanwhile: it scans nothing either
    assert scans() == before
    assert len(live_workers(isolated.redis)) == 1


def test_a_job_whose_sender_died_before_sending_its_message_is_sent_by_recovery_and_runs(isolated):
    from domain.records import JobRecord
    from storage.local import LocalStorage

    # What a web process leaves when it dies between writing the record and sending the message.
    jobs = isolated.jobs()
    job_id = "e" * 32
    input_key = f"tenants/default/jobs/{job_id}/input.png"
    LocalStorage(isolated.env["MASKQ_STORAGE_DIR"]).put(input_key, small_png(5), "image/png")
    jobs.create(
        JobRecord(
            id=job_id,
            tenant="default",
            lane="default",
            model="text-regions",
            input_key=input_key,
            image_sha256="0" * 64,
            width=64,
            height=48,
            request={"model": "text-regions"},
            created_at=time.time(),
        )
    )
    assert isolated.redis.zscore(keys.UNSENT, job_id) is not None and isolated.redis.llen("default") == 0
    # A job whose message did go out is not sent twice.
    client = isolated.client()
    other = submit(client, small_png(6)).get_json()["id"]
    assert isolated.redis.zscore(keys.UNSENT, other) is None and isolated.redis.llen("default") == 1
    isolated.worker(**FAST)
    record = wait_ended(isolated, job_id)
    assert str(record.status) == "succeeded" and record.attempts == 1
    assert str(wait_ended(isolated, other).status) == "succeeded" and jobs.get(other).attempts == 1
    assert not isolated.redis.zcard(keys.UNSENT)


def test_a_run_that_another_run_took_over_cannot_end_the_job(isolated):
    job_id, _ = queued_job(isolated)
    jobs = isolated.jobs()
    assert jobs.start(job_id, "1", worker="host-a:1")
    # Its heartbeat lapsed (the process was alive but stalled): recovery put the job back, and host-b runs it now.
    assert jobs.requeue(job_id, {"code": "worker_lost", "message": "test"})
    assert jobs.start(job_id, "1", worker="host-b:2")
    # host-a wakes up and finishes its run: fenced off, whatever it tries.
    assert not jobs.succeed(job_id, "tenants/default/jobs/x/result.json", 1, fence="host-a:1")
    assert not jobs.fail(job_id, "internal", "late", fence="host-a:1")
    assert not jobs.requeue(job_id, {"code": "resources", "message": "late"}, fence="host-a:1")
    assert jobs.get(job_id).status == "running" and jobs.get(job_id).worker == "host-b:2"
    assert jobs.succeed(job_id, "tenants/default/jobs/x/result.json", 1, fence="host-b:2")


def test_a_run_whose_job_was_put_back_cannot_fail_it_before_the_next_run_starts(isolated):
    # Found by the cluster's partition scenario's reasoning (tests/cluster): recovery keeps the record's
    # ``worker`` when it puts a job back, and a queued job may fail; the partitioned run, back before any
    # other run started the job, failed it (its store was away too) although the job was no longer its own.
    job_id, _ = queued_job(isolated)
    jobs = isolated.jobs()
    assert jobs.start(job_id, "1", worker="host-a:1")
    assert jobs.requeue(job_id, {"code": "worker_lost", "message": "test"})
    assert not jobs.fail(job_id, "storage", "the store was away", fence="host-a:1")
    assert jobs.get(job_id).status == "queued"
    assert jobs.start(job_id, "1", worker="host-b:2") == 2
    assert jobs.succeed(job_id, "tenants/default/jobs/x/result.json", 1, fence="host-b:2")


@pytest.mark.parametrize("taken", ["by another run", "by a cancel"])
def test_a_run_whose_job_was_taken_while_it_ran_writes_no_result(isolated, tmp_path, taken):
    """A run that stalled or was cut off (here: the record moved under it while its model ran) asks before it
    writes: no result lands over the new run's files, and the record stays the new run's (or canceled)."""
    from storage.local import LocalStorage
    from tests.support.slow_models import slow_manifest

    worker = isolated.worker(MASKQ_MODELS_MANIFEST=slow_manifest(tmp_path, delay_s=2))
    job_id = submit(isolated.client(), small_png(8)).get_json()["id"]
    jobs = isolated.jobs()
    wait_for(lambda: jobs.status(job_id) == "running", 20)
    if taken == "by another run":
        assert jobs.requeue(job_id, {"code": "worker_lost", "message": "test"})
        assert jobs.start(job_id, "1", worker="host-b:2")
    else:
        assert isolated.client().delete(f"/v1/jobs/{job_id}").status_code == 200
    wait_for(lambda: f"job {job_id}: this run stopped" in worker.log(), 30)
    keys_now = LocalStorage(isolated.env["MASKQ_STORAGE_DIR"]).list(f"tenants/default/jobs/{job_id}/")
    assert [k.rsplit("/", 1)[1] for k in keys_now] == ["input.png"]  # nothing written, nothing to discard
    record = jobs.get(job_id)
    if taken == "by another run":
        assert record.status == "running" and record.worker == "host-b:2"
    else:
        assert record.status == "canceled"


def test_a_run_killed_at_its_hard_time_limit_fails_only_a_job_it_still_holds(isolated, monkeypatch):
    """The worker's main process ends a job whose pool process it killed (tasks/run_job.py), fenced by that
    process: a job taken over meanwhile by another worker is left to it."""
    from workers.job_end import _main_process_jobs, end_killed_job

    for name, value in isolated.env.items():  # (a worker's main process reads its settings so)
        monkeypatch.setenv(name, str(value))
    _main_process_jobs.cache_clear()
    monkeypatch.setattr("workers.job_end.settle", lambda *args: None)  # (no waiting jobs here to settle)
    job_id, _ = queued_job(isolated)
    jobs = isolated.jobs()
    assert jobs.start(job_id, "1", worker="host-a:1")
    assert jobs.requeue(job_id, {"code": "worker_lost", "message": "test"})
    assert jobs.start(job_id, "1", worker="host-b:2")
    end_killed_job(job_id, "Hard time limit (10s) exceeded", "host-a:1")
    assert jobs.get(job_id).status == "running" and jobs.get(job_id).worker == "host-b:2"
    end_killed_job(job_id, "Hard time limit (10s) exceeded", "host-b:2")
    record = jobs.get(job_id)
    assert record.status == "failed" and record.error["code"] == "timeout"
    _main_process_jobs.cache_clear()


def test_a_pool_process_whose_start_up_failed_puts_its_job_back_instead_of_swallowing_it(isolated, tmp_path):
    from tests.conftest import WorkerProcess

    client = isolated.client()
    job_id = submit(client, small_png(11)).get_json()["id"]
    # Its storage folder cannot be made (a file is in the way): no pool process of this worker can start.
    (tmp_path / "a-file").write_text("")
    broken = {**isolated.env, "MASKQ_STORAGE_DIR": str(tmp_path / "a-file" / "storage")}
    worker = WorkerProcess(broken, "broken").start(isolated.redis, wait_ready=False)
    isolated.workers.append(worker)
    wait_for(lambda: "no worker state" in worker.log(), 60)  # it took the job, and gave it back
    worker.stop()
    assert isolated.jobs().get(job_id).status == "queued"
    isolated.worker("healthy")
    record = wait_ended(isolated, job_id)
    assert str(record.status) == "succeeded" and record.attempts == 1


def test_an_old_queued_job_whose_message_is_nowhere_is_sent_again_and_one_still_queued_is_not(isolated):
    client = isolated.client()
    lost = submit(client, small_png(12), {"lane": "batch"}).get_json()["id"]
    kept = submit(client, small_png(13), {"lane": "batch"}).get_json()["id"]
    # As a swallowed delivery leaves it: the record queued, its message gone, nothing marked unsent.
    message = isolated.redis.rpop("batch")
    assert json.loads(message)["headers"]["id"] == lost and isolated.redis.llen("batch") == 1
    for job_id in (lost, kept):  # both queued for two minutes already
        isolated.redis.zadd(keys.lane_index("batch"), {job_id: time.time() - 120})
    worker = isolated.worker(**FAST)
    for job_id in (lost, kept):
        record = wait_ended(isolated, job_id)
        assert str(record.status) == "succeeded" and record.attempts == 1
    assert "queued with its message in no lane" in worker.log() and worker.log().count(f"job {kept}: succeeded") == 1
