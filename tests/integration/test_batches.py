"""``/v1/batches`` against the real Redis: bad uploads, archives, cancel, completion counted once, restarts."""

from __future__ import annotations

import io
import json
import tarfile
import time
import zipfile

import pytest

from stores.batches import BatchStore
from stores.delivery_log import DeliveryLog
from stores.jobs import JobStore
from tests.conftest import authorized_client, image_bytes
from tests.integration.helpers import small_png, status, wait_for
from tests.support.slow_models import slow_manifest

TEXT = {"model": "text-regions", "prompts": {"text": ["dataset"]}}
NOWHERE = "http://127.0.0.1:9/"  # loopback's discard port: a delivery there is refused, and reaches no one


def post_batch(client, images=(), request=None, archive=None, prompts=None, headers=None):
    data = {"request": json.dumps(request if request is not None else TEXT)}
    data["images"] = [(io.BytesIO(blob), name) for name, blob in images]
    if archive is not None:
        data["archive"] = (io.BytesIO(archive[1]), archive[0])
    if prompts is not None:
        data["prompts"] = json.dumps(prompts)
    return client.post("/v1/batches", data=data, content_type="multipart/form-data", headers=headers or {})


def zipped(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, blob in members.items():
            archive.writestr(name, blob)
    return out.getvalue()


def tarred(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return out.getvalue()


@pytest.fixture
def stack(isolated):
    """An app on a Redis of the test's own, with no worker: every job stays queued."""
    return isolated


def test_bad_uploads_get_clear_4xx_and_leave_no_batch(client, redis_client):
    en = image_bytes("en.jpg")
    assert post_batch(client).status_code == 422  # no images at all
    answer = client.post("/v1/batches", json={"images": []})
    assert answer.status_code == 415 and "multipart" in answer.get_json()["detail"]
    answer = post_batch(client, [("a.jpg", en)], request={"lane": "nope"})
    assert answer.status_code == 422 and answer.get_json()["errors"][0]["field"] == "lane"
    answer = client.post(
        "/v1/batches",
        data={"request": "{not json", "images": [(io.BytesIO(en), "a.jpg")]},
        content_type="multipart/form-data",
    )
    assert answer.status_code == 400 and "not valid JSON" in answer.get_json()["detail"]
    answer = post_batch(client, [("a.jpg", en)], prompts={"b.jpg": {"text": ["x"]}})
    assert answer.status_code == 422 and "b.jpg" in answer.get_json()["detail"]
    answer = post_batch(client, [("a.jpg", en)], prompts={"a.jpg": {"points": "here"}})
    assert answer.status_code == 422
    many = {f"{n}.jpg": {"text": ["x"]} for n in range(100_000)}  # 2 MB of names: refused before validating
    started = time.monotonic()
    answer = post_batch(client, [("a.jpg", en)], prompts=many)
    assert answer.status_code == 422 and "at most" in answer.get_json()["detail"]
    assert time.monotonic() - started < 5
    answer = post_batch(client, [("a.jpg", en), ("a.jpg", en)])
    assert answer.status_code == 422 and "unique" in answer.get_json()["detail"]
    answer = post_batch(client, [("x.jpg", b"\xff\xd8\xff broken"), ("y.png", b"nothing")])
    assert answer.status_code == 422 and {e["field"] for e in answer.get_json()["errors"]} == {"x.jpg", "y.png"}
    answer = post_batch(client, archive=("photos.zip", b"PK\x03\x04 this is no zip"))
    assert answer.status_code == 400
    answer = post_batch(client, archive=("photos.tar", b"neither zip nor tar" * 50))
    assert answer.status_code == 400 and "neither a zip nor a tar" in answer.get_json()["detail"]
    answer = post_batch(client, [("a.jpg", en)], request=[])
    assert answer.status_code == 422  # a JSON array is no request, not an empty one
    answer = post_batch(client, [("a.jpg", en)], prompts=[])
    assert answer.status_code == 422
    huge = client.post(
        "/v1/batches",
        data={"request": "{" + " " * 10_000_000 + "}", "images": [(io.BytesIO(en), "a.jpg")]},
        content_type="multipart/form-data",
    )
    assert huge.status_code == 413  # a 10 MB text field: refused while the form is read
    huge = client.post(
        "/v1/batches",
        data={"prompts": (io.BytesIO(b" " * 9_000_000), "prompts.json"), "images": [(io.BytesIO(en), "a.jpg")]},
        content_type="multipart/form-data",
    )
    assert huge.status_code == 413 and "prompts part" in huge.get_json()["detail"]
    assert not list(redis_client.scan_iter(match="maskq:batch:*"))  # none of these made a batch
    assert not list(redis_client.scan_iter(match="maskq:job:*"))


def test_the_request_and_prompts_may_come_as_file_parts(stack):
    client = stack.client()
    answer = client.post(
        "/v1/batches",
        content_type="multipart/form-data",
        data={
            "request": (io.BytesIO(json.dumps(TEXT).encode()), "request.json"),
            "prompts": (io.BytesIO(json.dumps({"en.jpg": {"text": ["shot"]}}).encode()), "prompts.json"),
            "images": [(io.BytesIO(image_bytes("en.jpg")), "en.jpg")],
        },
    )
    assert answer.status_code == 202, answer.get_json()
    record = stack.jobs().get(answer.get_json()["jobs"][0]["id"])
    assert record.request.prompts.text == ["shot"] and record.model == "text-regions"


def test_a_batch_is_bounded_in_images_and_bytes(stack):
    client = stack.client(max_batch_images=2, max_batch_bytes=200_000)
    en = image_bytes("en.jpg")
    answer = post_batch(client, [("a.jpg", en), ("b.jpg", en), ("c.jpg", en)])
    assert answer.status_code == 413 and "MASKQ_MAX_BATCH_IMAGES" in answer.get_json()["detail"]
    # A zip bomb: a few kilobytes that claim (and inflate to) 50 MB; refused on the sizes it declares.
    bomb = zipped({"a.png": b"\0" * 50_000_000})
    assert len(bomb) < 100_000
    answer = post_batch(client, archive=("bomb.zip", bomb))
    assert answer.status_code == 413 and "MASKQ_MAX_BATCH_BYTES" in answer.get_json()["detail"]
    too_many = zipped({f"{n}.jpg": b"x" for n in range(3)})
    assert post_batch(client, archive=("many.zip", too_many)).status_code == 413
    whole = client.post(
        "/v1/batches", data={"images": [(io.BytesIO(b"\0" * 1_500_000), "big.jpg")]}, content_type="multipart/form-data"
    )
    assert whole.status_code == 413  # the upload itself is over MASKQ_MAX_BATCH_BYTES
    parts = client.post(
        "/v1/batches",
        data={"images": [(io.BytesIO(b"x"), f"{n}.jpg") for n in range(1500)]},
        content_type="multipart/form-data",
    )
    assert parts.status_code == 413  # more parts than the form parser takes (Flask's MAX_FORM_PARTS)
    assert not list(stack.redis.scan_iter(match="maskq:batch:*"))


def test_archives_fan_out_one_job_per_image_and_cancel_cancels_the_queued_ones(stack):
    client = stack.client()
    members = {
        "shots/en.jpg": image_bytes("en.jpg"),
        "shots/latin.jpg": image_bytes("latin.jpg"),
        "__MACOSX/shots/._en.jpg": b"junk",
        "notes.txt": b"not an image",
        "../up.jpg": image_bytes("en.jpg"),
    }
    for archive in (("shots.zip", zipped(members)), ("shots.tar.gz", tarred(members))):
        answer = post_batch(client, archive=archive)
        assert answer.status_code == 202, answer.get_json()
        batch = answer.get_json()
        assert answer.headers["Location"].endswith(f"/v1/batches/{batch['id']}")
        assert [j["file_name"] for j in batch["jobs"]] == ["shots/en.jpg", "shots/latin.jpg", "../up.jpg"]
        assert batch["status"] == "running" and batch["counts"]["queued"] == 3 and batch["lane"] == "batch"
        jobs = stack.jobs()
        assert {jobs.get(j["id"]).lane for j in batch["jobs"]} == {"batch"}
        assert {jobs.get(j["id"]).batch for j in batch["jobs"]} == {batch["id"]}

    canceled = client.delete(f"/v1/batches/{batch['id']}")
    assert canceled.status_code == 200
    after = canceled.get_json()
    assert after["status"] == "canceled" and after["counts"]["canceled"] == 3 and after["progress"] == 1.0
    assert client.delete(f"/v1/batches/{batch['id']}").status_code == 409
    # Its completion was announced once, though no receiver was asked for: no message without a webhook.
    assert DeliveryLog(stack.redis).for_job(batch["id"]) == []


def test_the_last_job_to_end_completes_the_batch_once_and_its_event_is_queued_once(stack):
    client = stack.client()
    hook = {"url": NOWHERE, "events": ["batch.completed"]}
    answer = post_batch(
        client,
        [("en.jpg", image_bytes("en.jpg")), ("latin.jpg", image_bytes("latin.jpg"))],
        request={**TEXT, "webhook": hook},
    )
    batch = answer.get_json()
    jobs, store = JobStore(stack.redis, 3600), BatchStore(stack.redis, JobStore(stack.redis, 3600))
    first, second = (j["id"] for j in batch["jobs"])
    for job_id in (first, second):
        assert jobs.start(job_id, "v1", worker="test:1")
    assert jobs.succeed(first, "r", 1, fence="test:1")
    assert store.get(batch["id"]).completed_at is None
    assert jobs.fail(second, "boom", "it broke", fence="test:1")
    assert not jobs.fail(second, "boom", "again", fence="test:1")  # an ended job does not end twice
    done = store.get(batch["id"])
    assert done.completed_at is not None and done.status == "completed"
    assert store.take_due_events() == [batch["id"]]
    assert store.take_due_events() == []  # taken under a lease: no second notifier gets it
    # The notifier died before queuing it: once the lease runs out, the next one does.
    stack.redis.zadd("maskq:batches:unnotified", {batch["id"]: time.time() - 1})
    read = client.get(f"/v1/batches/{batch['id']}")  # any reader queues what is due
    assert read.get_json()["counts"] == {**read.get_json()["counts"], "succeeded": 1, "failed": 1}
    messages = DeliveryLog(stack.redis).for_job(batch["id"])
    assert [(m.event, m.url) for m in messages] == [("batch.completed", NOWHERE)]
    assert json.loads(messages[0].body)["status"] == "completed"
    assert stack.redis.zcard("maskq:batches:unnotified") == 0


def test_a_batch_outlives_the_web_process_and_its_jobs_run_on_a_worker_started_later(stack):
    first_web = stack.client()
    batch = post_batch(first_web, [("en.jpg", image_bytes("en.jpg")), ("black.jpg", image_bytes("empty_black.jpg"))])
    batch_id = batch.get_json()["id"]
    stack.worker()
    later_web = stack.client()  # a new app: nothing of the first one's memory
    later_web.environ_base["HTTP_AUTHORIZATION"] = first_web.environ_base["HTTP_AUTHORIZATION"]
    deadline = time.monotonic() + 90
    while (doc := later_web.get(f"/v1/batches/{batch_id}").get_json())["status"] != "completed":
        assert time.monotonic() < deadline, doc
        time.sleep(0.2)
    assert doc["counts"]["succeeded"] == 2 and doc["eta_s"] is None
    coco = later_web.get(f"/v1/batches/{batch_id}/coco").get_json()
    assert sorted(i["file_name"] for i in coco["images"]) == ["black.jpg", "en.jpg"]


def test_a_batch_outlives_a_killed_worker_and_a_redis_restart_and_completes_once(isolated, tmp_path):
    """A machine dies mid-batch, then Redis restarts (from its AOF): every job ends once, the batch once."""
    env = {
        "MASKQ_VISIBILITY_TIMEOUT_S": 12,
        "MASKQ_JOB_SOFT_TIME_LIMIT_S": 8,
        "MASKQ_JOB_HARD_TIME_LIMIT_S": 10,
        "MASKQ_STORAGE_RETRY_BOUND_S": 2,
        "MASKQ_UNACKED_RESTORE_INTERVAL_S": 1,
    }
    client = isolated.client(**{k[6:].lower(): v for k, v in env.items()})
    first = isolated.worker("first", MASKQ_MODELS_MANIFEST=slow_manifest(tmp_path, delay_s=1), **env)
    hook = {"url": NOWHERE, "events": ["batch.completed"]}
    images = [(f"{n}.png", small_png(n)) for n in range(5)]
    batch = post_batch(client, images, request={"model": "text-regions", "webhook": hook}).get_json()
    jobs = isolated.jobs()
    ids = [j["id"] for j in batch["jobs"]]
    wait_for(lambda: any(status(jobs, job_id) == "running" for job_id in ids), 30)
    first.kill()  # main process and children at once, as a machine dying would
    time.sleep(1.2)  # AOF is written every second
    isolated.server.stop()
    isolated.server.start()
    isolated.worker("second", **env)
    deadline = time.monotonic() + 120
    while (doc := client.get(f"/v1/batches/{batch['id']}").get_json())["status"] != "completed":
        assert time.monotonic() < deadline, doc
        time.sleep(0.3)
    assert doc["counts"]["succeeded"] == 5 and doc["done"] == 5
    time.sleep(1)  # any second completion would have been queued by now
    messages = DeliveryLog(isolated.redis).for_job(batch["id"])
    assert [m.event for m in messages] == ["batch.completed"]


def test_an_upload_cut_off_midway_is_sealed_with_the_jobs_it_has(stack):
    client = stack.client(batch_receive_timeout_s=0.5)
    batch = post_batch(client, [("en.jpg", image_bytes("en.jpg"))]).get_json()
    # As if the web process had died before sealing, between counting a job pending and writing its record.
    stack.redis.hdel(f"maskq:batch:{batch['id']}", "sealed_at")
    stack.redis.sadd(f"maskq:batch:{batch['id']}:pending", "f" * 32)
    assert client.get(f"/v1/batches/{batch['id']}").get_json()["status"] in ("receiving", "running")
    time.sleep(0.6)
    doc = client.get(f"/v1/batches/{batch['id']}").get_json()
    assert doc["status"] == "running" and doc["total"] == 1
    assert stack.redis.smembers(f"maskq:batch:{batch['id']}:pending") == {batch["jobs"][0]["id"].encode()}
    ended = client.delete(f"/v1/batches/{batch['id']}").get_json()  # its one real job ends: the batch completes
    assert ended["status"] == "canceled" and ended["completed_at"] is not None


def test_the_same_idempotency_key_and_upload_return_the_same_batch(client):
    images = [("en.jpg", image_bytes("en.jpg"))]
    first = post_batch(client, images, headers={"Idempotency-Key": "nightly-2026-12-02"})
    again = post_batch(client, images, headers={"Idempotency-Key": "nightly-2026-12-02"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    other = post_batch(
        client, [("latin.jpg", image_bytes("latin.jpg"))], headers={"Idempotency-Key": "nightly-2026-12-02"}
    )
    assert other.status_code == 422


def test_another_tenants_batch_is_a_404(app, client):
    batch = post_batch(client, [("en.jpg", image_bytes("en.jpg"))]).get_json()
    stranger = authorized_client(app, tenant="stranger")
    assert stranger.get(f"/v1/batches/{batch['id']}").status_code == 404
    assert stranger.delete(f"/v1/batches/{batch['id']}").status_code == 404
    assert stranger.get(f"/v1/batches/{batch['id']}/coco").status_code == 404
    assert client.get("/v1/batches/../../etc").status_code == 404
    assert client.get(f"/v1/batches/{'z' * 32}").status_code == 404


def test_a_batch_webhook_listing_job_events_gives_each_job_that_webhook_and_only_those_events(stack):
    client = stack.client()
    hook = {"url": NOWHERE, "events": ["batch.completed", "job.failed"]}
    batch = post_batch(client, [("en.jpg", image_bytes("en.jpg"))], request={**TEXT, "webhook": hook}).get_json()
    record = stack.jobs().get(batch["jobs"][0]["id"])
    assert record.request.webhook.model_dump() == {"url": NOWHERE, "events": ["job.failed"]}
    quiet = post_batch(
        client, [("en.jpg", image_bytes("en.jpg"))], request={**TEXT, "webhook": {"url": NOWHERE}}
    ).get_json()
    assert stack.jobs().get(quiet["jobs"][0]["id"]).request.webhook is None  # batch.completed alone
    private = post_batch(
        client, [("en.jpg", image_bytes("en.jpg"))], request={**TEXT, "webhook": {"url": "http://10.0.0.1/hook"}}
    )
    assert private.status_code == 422  # the SSRF guard, at submit: nothing is ever sent there
