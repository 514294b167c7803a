"""The S3 store goes away while jobs run: within the retry bound nothing fails and nothing is lost.

A real S3-compatible server process (moto, made durable by a request journal;
see ``tests/integration/s3_server.py``) is SIGKILLed mid-run and started again
on the same port; a real worker process with the S3 backend rides it out.
"""

from __future__ import annotations

import time

import pytest

from domain.keys import job_prefix
from runtime.embedded_redis import RedisServer
from tests.conftest import VENV_BIN, IsolatedStack, authorized_client, clean_redis, free_port, image_bytes, require
from tests.integration.helpers import small_png, submit
from tests.integration.s3_server import S3Server
from tests.support.slow_models import slow_manifest
from webapp.app import create_app

BOUND_S = 8
BUCKET = "maskq-outage"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    require((VENV_BIN / "moto_server").exists(), "moto[server] (requirements-dev.txt) for a real S3-compatible server")
    server = S3Server(free_port(), tmp_path_factory.mktemp("s3") / "journal.jsonl").start()
    server.create_bucket(BUCKET)
    yield server
    server.kill()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, base_env, s3):
    """Redis, a worker and a front end of this module's own, all on the S3 backend."""
    folder = tmp_path_factory.mktemp("outage")
    server = RedisServer(free_port(), folder / "redis").start()
    env = {
        **base_env,
        **s3.env_for(BUCKET),
        "MASKQ_REDIS_URL": server.url,
        "MASKQ_DATA_DIR": str(folder / "data"),
        "MASKQ_STORAGE_RETRY_BOUND_S": str(BOUND_S),
        "MASKQ_STORAGE_RETRY_MAX_S": "1",
        # Jobs wait 0.3 s before inference: the bound test kills the store while its job waits there.
        "MASKQ_MODELS_MANIFEST": str(slow_manifest(folder, delay_s=0.3)),
    }
    stack = IsolatedStack(server, env)
    stack.worker("s3")
    stack.app = create_app(stack.settings())
    yield stack
    stack.close()


@pytest.fixture
def clean(stack, s3):
    if not (s3.process and s3.process.poll() is None):
        s3.start()
    clean_redis(stack.redis)
    yield authorized_client(stack.app)  # after the flush: the API key lives in Redis
    clean_redis(stack.redis)


def wait_for_log(worker, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in worker.log():
        assert time.monotonic() < deadline, f"{text!r} never appeared in the worker's log"
        time.sleep(0.05)


def test_jobs_running_while_the_store_restarts_all_succeed_and_nothing_is_lost(stack, s3, clean):
    client = clean
    images = [image_bytes(name) for name in ("empty_black.jpg", "en.jpg", "ch_en_num.jpg", "empty_black.jpg")]
    ids = []
    for image in images:
        answer = submit(client, image, {"outputs": ["rle", "png"]})
        assert answer.status_code == 202, answer.get_json()
        ids.append(answer.get_json()["id"])
    worker = stack.workers[0]
    writes_before = worker.log().count("storage unavailable (cannot write")
    wait_for_status(client, ids[1], "running")
    # The job reads its input, waits 0.3 s and runs the model (well over a second for en.jpg here):
    # killed now, the store is away when the job writes its result.
    time.sleep(0.55)
    s3.kill()
    deadline = time.monotonic() + 30
    while worker.log().count("storage unavailable (cannot write") == writes_before:
        assert time.monotonic() < deadline, "no result write met the outage"
        time.sleep(0.05)
    time.sleep(1.5)  # the store stays away a while longer: more retries, and the next job's reads meet it too
    s3.start()

    jobs = [client.get(f"/v1/jobs/{job_id}?wait=30").get_json() for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * len(ids), [j.get("error") for j in jobs]
    bucket = s3.client()
    for job in jobs:
        keys = {
            o["Key"]
            for o in bucket.list_objects_v2(Bucket=BUCKET, Prefix=job_prefix("default", job["id"])).get("Contents", [])
        }
        assert job_prefix("default", job["id"]) + "result.json" in keys
        assert len([k for k in keys if "/masks/" in k]) == len(job["result"]["instances"])
        assert job["result"]["input_url"].startswith(s3.url)  # presigned, straight from the store
        assert stack.jobs().get(job["id"]).attempts == 1  # each ran once: retried writes, not re-runs


def wait_for_status(client, job_id: str, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.get(f"/v1/jobs/{job_id}").get_json()["status"] != status:
        assert time.monotonic() < deadline, f"job {job_id} never became {status}"
        time.sleep(0.02)


def test_a_store_that_stays_away_past_the_bound_fails_the_job_with_code_storage(stack, s3, clean):
    client = clean
    job_id = submit(client, image_bytes("empty_black.jpg")).get_json()["id"]
    wait_for_status(client, job_id, "running")
    s3.kill()  # while the job waits before inference: its result cannot be written
    started = time.monotonic()
    job = client.get(f"/v1/jobs/{job_id}?wait=30").get_json()
    assert job["status"] == "failed" and job["error"]["code"] == "storage", job
    assert time.monotonic() - started >= BOUND_S - 1  # it kept trying for the bound first


def test_a_submit_while_the_store_is_away_is_a_503_with_retry_after_and_nothing_is_queued(stack, s3, clean):
    client = clean
    s3.kill()
    answer = submit(client, small_png(8))
    assert answer.status_code == 503 and answer.mimetype == "application/problem+json"
    assert int(answer.headers["Retry-After"]) >= 1  # a client can tell "try again" from "broken"
    assert not list(stack.redis.scan_iter(match="maskq:job:*"))
