"""No accepted job is lost, and none has a double effect: killed workers, a restarted Redis."""

from __future__ import annotations

import os
import signal
import time

import pytest

from storage.local import LocalStorage
from tests.conftest import image_bytes
from tests.integration.helpers import small_png, status, submit, wait_for
from tests.support.slow_models import slow_manifest


def published(pubsub) -> list[str]:
    seen = []
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        if message["type"] == "message":
            seen.append(message["data"].decode())
    return seen


def assert_succeeded_once(isolated, job_id: str, pubsub) -> None:
    record = isolated.jobs().get(job_id)
    assert record.status == "succeeded"
    assert record.attempts == 2  # the killed run and the one that finished
    keys = LocalStorage(isolated.env["MASKQ_STORAGE_DIR"]).list(f"tenants/default/jobs/{job_id}/")
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == ["input.jpg", "result.json"]
    assert published(pubsub).count("succeeded") == 1


def test_a_job_whose_pool_process_is_sigkilled_mid_inference_runs_again_and_succeeds_once(isolated, tmp_path):
    client = isolated.client()
    worker = isolated.worker(MASKQ_MODELS_MANIFEST=slow_manifest(tmp_path, delay_s=1.5))
    job_id = submit(client, image_bytes("en.jpg")).get_json()["id"]
    pubsub = isolated.redis.pubsub()
    pubsub.subscribe(f"maskq:job:{job_id}:events")
    jobs = isolated.jobs()
    wait_for(lambda: status(jobs, job_id) == "running", 20)
    [child] = worker.children()
    os.kill(child, signal.SIGKILL)  # as the kernel's OOM killer would
    assert client.get(f"/v1/jobs/{job_id}?wait=30").get_json()["status"] == "succeeded"
    assert worker.alive
    assert_succeeded_once(isolated, job_id, pubsub)


def test_a_job_whose_whole_worker_is_sigkilled_is_taken_up_by_another_worker(isolated, tmp_path):
    # A short visibility timeout (above the hard time limit, as the start-up check demands)
    # makes the broker hand the dead worker's job to the next one within seconds.
    env = {
        "MASKQ_VISIBILITY_TIMEOUT_S": 12,
        "MASKQ_JOB_SOFT_TIME_LIMIT_S": 8,
        "MASKQ_JOB_HARD_TIME_LIMIT_S": 10,
        "MASKQ_STORAGE_RETRY_BOUND_S": 2,
        "MASKQ_UNACKED_RESTORE_INTERVAL_S": 1,
    }
    settings = {k[6:].lower(): v for k, v in env.items()}
    client = isolated.client(**settings)
    first = isolated.worker("first", MASKQ_MODELS_MANIFEST=slow_manifest(tmp_path, delay_s=1.5), **env)
    job_id = submit(client, image_bytes("ch_en_num.jpg")).get_json()["id"]
    pubsub = isolated.redis.pubsub()
    pubsub.subscribe(f"maskq:job:{job_id}:events")
    jobs = isolated.jobs()
    wait_for(lambda: status(jobs, job_id) == "running", 20)
    first.kill()  # main process and children at once, as a machine dying would
    assert not first.alive
    isolated.worker("second", **env)
    job = client.get(f"/v1/jobs/{job_id}?wait=30").get_json()
    if job["status"] != "succeeded":  # the broker hands it over only after the visibility timeout
        job = client.get(f"/v1/jobs/{job_id}?wait=30").get_json()
    assert job["status"] == "succeeded"
    assert_succeeded_once(isolated, job_id, pubsub)


def test_every_job_queued_before_a_redis_restart_completes_after_it(isolated):
    client = isolated.client()
    ids = [submit(client, small_png(i), {"lane": ("batch", "default")[i % 2]}).get_json()["id"] for i in range(12)]
    isolated.server.stop()  # SIGTERM: Redis writes its AOF and exits
    isolated.server.start()
    worker = isolated.worker()
    for job_id in ids:
        assert client.get(f"/v1/jobs/{job_id}?wait=30").get_json()["status"] == "succeeded", job_id
    assert worker.alive


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_job_running_while_redis_restarts_ends_exactly_once_and_so_do_the_queued_ones(isolated, tmp_path, how):
    """Redis goes away (a clean stop, or SIGKILL) while a job runs and comes back from its AOF."""
    client = isolated.client()
    worker = isolated.worker(MASKQ_MODELS_MANIFEST=slow_manifest(tmp_path, delay_s=2))
    ids = [submit(client, small_png(i), {"lane": "batch"}).get_json()["id"] for i in range(4)]
    jobs = isolated.jobs()
    wait_for(lambda: status(jobs, ids[0]) == "running", 20)
    time.sleep(1.2)  # AOF is written every second: the job's running state is on disk before a SIGKILL
    getattr(isolated.server, how)()  # the job finishes while Redis is away: its outcome cannot be written yet
    time.sleep(2.5)
    isolated.server.start()
    ended = wait_for(lambda: all(jobs.get(job_id).status.ended for job_id in ids) and ids, 120, interval=0.5)
    assert [str(jobs.get(job_id).status) for job_id in ended] == ["succeeded"] * len(ids)
    for job_id in ids:  # each ran to a stored result exactly once
        assert worker.log().count(f"job {job_id}: succeeded with") == 1, worker.log()[-4000:]
    assert worker.alive
