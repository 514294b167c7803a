"""``Idempotency-Key`` on submit, against the real app, Redis and worker: retries never make a second job."""

from __future__ import annotations

import base64
import io
import json
import threading

import pytest

from tests.conftest import authorized_client, image_bytes

REQUEST = {"prompts": {"text": ["Dataset"]}}


def post(client, key: str, image: bytes, request: dict | None = REQUEST):
    data = {"image": (io.BytesIO(image), "photo.jpg")}
    if request is not None:
        data["request"] = json.dumps(request)
    return client.post("/v1/jobs", data=data, content_type="multipart/form-data", headers={"Idempotency-Key": key})


def job_records(redis_client) -> list[bytes]:
    return list(redis_client.scan_iter(match="maskq:job:*[0-9a-f]"))


@pytest.mark.usefixtures("worker")
def test_a_replayed_submit_returns_the_same_job_and_the_model_runs_once(client, redis_client):
    image = image_bytes("en.jpg")
    first = post(client, "retry-1", image)
    assert first.status_code == 202
    job_id = first.get_json()["id"]

    ended = client.get(f"/v1/jobs/{job_id}?wait=30").get_json()
    assert ended["status"] == "succeeded"
    again = post(client, "retry-1", image)
    assert again.status_code == 200  # the job as it stands: it has ended
    assert again.get_json()["id"] == job_id and again.get_json()["status"] == "succeeded"
    assert again.headers["Location"] == f"/v1/jobs/{job_id}" and again.headers["Idempotent-Replayed"] == "true"
    # The same request inline as JSON is the same body: still the one job.
    inline = {"image": {"base64": base64.b64encode(image).decode()}, **REQUEST}
    as_json = client.post("/v1/jobs", json=inline, headers={"Idempotency-Key": "retry-1"})
    assert as_json.status_code == 200 and as_json.get_json()["id"] == job_id

    # One record, one run: the worker started it once, and nothing waits in a lane.
    assert job_records(redis_client) == [f"maskq:job:{job_id}".encode()]
    assert redis_client.hget(f"maskq:job:{job_id}", "attempts") == b"1"
    assert sum(redis_client.llen(lane) for lane in ("interactive", "default", "batch")) == 0


def test_a_replay_while_the_job_waits_is_a_202_with_the_same_id(client, redis_client):
    first = post(client, "retry-2", image_bytes("en.jpg"))
    again = post(client, "retry-2", image_bytes("en.jpg"))
    assert first.status_code == again.status_code == 202
    assert again.get_json()["id"] == first.get_json()["id"]
    assert len(job_records(redis_client)) == 1


def test_the_same_key_with_a_different_body_is_a_422_and_makes_no_job(client, redis_client):
    assert post(client, "retry-3", image_bytes("en.jpg")).status_code == 202
    for image, request in (
        (image_bytes("en.jpg"), {"prompts": {"text": ["other"]}}),
        (image_bytes("ch_en_num.jpg"), REQUEST),
        (image_bytes("en.jpg"), None),
    ):
        answer = post(client, "retry-3", image, request)
        assert answer.status_code == 422 and answer.mimetype == "application/problem+json"
        assert [e["field"] for e in answer.get_json()["errors"]] == ["Idempotency-Key"]
    assert len(job_records(redis_client)) == 1


def test_keys_are_per_tenant_and_a_bad_key_is_a_400(app, redis_client):
    acme, globex = authorized_client(app, "acme"), authorized_client(app, "globex")
    ids = {post(c, "shared-key", image_bytes("en.jpg")).get_json()["id"] for c in (acme, globex)}
    assert len(ids) == 2
    for bad in ("", "x" * 256):
        answer = post(acme, bad, image_bytes("en.jpg"))
        assert answer.status_code == 400 and answer.get_json()["errors"][0]["field"] == "Idempotency-Key"
    assert len(job_records(redis_client)) == 2


def test_a_failed_submit_lets_its_key_go_so_the_retry_succeeds(app, client, redis_client):
    from webapp.idempotency import claim

    image = image_bytes("en.jpg")
    held = claim(redis_client, "default", "retry-4", "a" * 32, image, REQUEST, ttl_s=60)
    held.settle(app.response_class(status=503))  # what a failure after the claim answers
    assert not list(redis_client.scan_iter(match="maskq:idempotency:*"))
    assert post(client, "retry-4", image).status_code == 202


def test_concurrent_identical_submits_make_one_job(app, client, redis_client):
    image = image_bytes("en.jpg")
    answers = []

    def send():
        own = app.test_client()  # a client per thread; all with the same key
        own.environ_base["HTTP_AUTHORIZATION"] = client.environ_base["HTTP_AUTHORIZATION"]
        answers.append(post(own, "race", image))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(answers) == 6
    made = {a.get_json()["id"] for a in answers if a.status_code == 202}
    assert len(made) == 1, [a.status_code for a in answers]
    # The rest either got that job back or were told to retry while it was being made.
    assert all(a.status_code == 409 or a.get_json()["id"] in made for a in answers)
    assert len(job_records(redis_client)) == 1
