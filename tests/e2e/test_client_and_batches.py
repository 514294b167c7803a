"""The Python client (``maskq.Client``) and server-side batches against a real web server and worker.

A batch of the repository's test images goes up in one request, is followed to
its end through ``GET /v1/batches/{id}``, its COCO file is read by pycocotools,
and its ``batch.completed`` webhook is received by a real HTTP receiver and
verified with the client's ``verify_webhook``.
"""

from __future__ import annotations

import json
import time

import pytest
from pycocotools.coco import COCO

from maskq import ApiError, Client, WebhookVerificationError, verify_webhook
from stores.tenants import KeyStore
from stores.webhooks import tenant_secret
from tests.conftest import IMAGES, free_port
from tests.integration.webhook_receiver import Receiver

pytestmark = pytest.mark.usefixtures("worker")

TEXT = {"model": "text-regions", "prompts": {"text": ["dataset"]}}
SHARED_IMAGES = sorted(p for p in IMAGES.iterdir() if p.suffix == ".jpg")


@pytest.fixture
def receiver(tmp_path):
    receiver = Receiver(free_port(), tmp_path).start()
    yield receiver
    receiver.stop()


def new_key(redis_client, tenant: str = "clients", **policy) -> str:
    key, _ = KeyStore(redis_client).create(tenant, **policy)
    return key


def test_a_client_round_trip_submit_get_wait_cancel(web, redis_client):
    client = Client(web, new_key(redis_client))
    job = client.segment(IMAGES / "en.jpg", text="dataset", model="text-regions", lane="interactive")
    assert job.succeeded, job.document
    assert any("Dataset" in instance["label"] for instance in job.instances)
    assert job.document["metrics"]["total"] > 0
    again = client.get(job.id)
    assert again.id == job.id and again.status == "succeeded" and again.instances == job.instances

    queued = client.submit((IMAGES / "latin.jpg").read_bytes(), {**TEXT, "lane": "batch"})
    waited = client.wait(queued.id, timeout=60)
    assert waited.ended and waited.id == queued.id
    with pytest.raises(ApiError) as ended:
        client.cancel(waited.id)  # an ended job: the service's 409, as an exception with its detail
    assert ended.value.status == 409 and "already ended" in ended.value.detail

    with pytest.raises(ApiError) as refused:
        client.segment(b"\x89PNG\r\n\x1a\n not a png", text="x", model="text-regions")
    assert refused.value.status == 400 and refused.value.detail
    with pytest.raises(ApiError) as missing:
        client.get("0" * 32)
    assert missing.value.status == 404


def test_the_client_sends_one_idempotency_key_per_submit_so_a_repeat_is_the_same_job(web, redis_client):
    client = Client(web, new_key(redis_client))
    first = client.submit(IMAGES / "en.jpg", TEXT, idempotency_key="folder-run-1")
    second = client.submit(IMAGES / "en.jpg", TEXT, idempotency_key="folder-run-1")
    assert second.id == first.id
    third = client.submit(IMAGES / "en.jpg", TEXT)  # a key of its own: a new job
    assert third.id != first.id


def test_the_client_waits_out_429s_by_their_retry_after(web, redis_client):
    client = Client(web, new_key(redis_client, rate="2/second"))
    started = time.monotonic()
    answers = [client.models() for _ in range(6)]  # over the key's rate: some 429s, each retried after waiting
    assert all(any(m["name"] == "text-regions" for m in models) for models in answers)
    assert time.monotonic() - started >= 1.0  # it waited for the window, not hammered through
    impatient = Client(web, client.session.headers["Authorization"].split()[1], retries=0)
    with pytest.raises(ApiError) as limited:  # noqa: PT012 - one of the six calls earns the 429
        for _ in range(6):
            impatient.models()
    assert limited.value.status == 429 and limited.value.retry_after is not None


def test_a_batch_of_the_test_images_is_followed_to_its_end_read_as_coco_and_announced_by_a_signed_webhook(
    web, redis_client, receiver, tmp_path
):
    client = Client(web, new_key(redis_client, tenant="datateam"))
    request = {**TEXT, "webhook": {"url": receiver.url, "events": ["batch.completed"]}}
    per_image = {"ch_en_num.jpg": {"text": ["促销"]}}
    broken = b"\xff\xd8\xff not a jpeg"
    names = [p.name for p in SHARED_IMAGES] + ["broken.jpg"]
    batch = client.submit_batch([*SHARED_IMAGES, broken], request, prompts=per_image, names=names)
    assert batch.status in ("running", "completed")
    assert batch.total == len(SHARED_IMAGES)
    assert [(r["file_name"], r["status"]) for r in batch.document["rejected"]] == [("broken.jpg", 400)]
    assert [j["file_name"] for j in batch.document["jobs"]] == [p.name for p in SHARED_IMAGES]

    seen = []
    done = client.wait_batch(batch.id, timeout=120, poll_s=0.2, progress=lambda b: seen.append(b.document["done"]))
    assert done.status == "completed", done.document
    assert done.counts["succeeded"] == len(SHARED_IMAGES) and done.document["progress"] == 1.0
    assert seen == sorted(seen) and seen[-1] == len(SHARED_IMAGES)  # progress only goes up

    coco_path = tmp_path / "batch.json"
    coco_path.write_text(json.dumps(client.batch_coco(batch.id)))
    coco = COCO(str(coco_path))  # pycocotools reads it as it is
    assert sorted(i["file_name"] for i in coco.dataset["images"]) == sorted(p.name for p in SHARED_IMAGES)
    assert [f["file_name"] for f in coco.dataset["failures"]] == ["broken.jpg"]
    for annotation in coco.dataset["annotations"]:
        assert int(coco.annToMask(annotation).sum()) == annotation["area"]
    labels = {a["label"] for a in coco.dataset["annotations"]}
    assert any("促销" in label for label in labels), labels  # the per-image prompt was that image's
    assert any("Dataset" in label for label in labels), labels

    delivered = receiver.wait_for(1, timeout=30)
    time.sleep(0.5)
    assert len(receiver.received()) == 1  # exactly one batch.completed
    headers = delivered[0]["headers"]
    assert headers["maskq-event"] == "batch.completed"
    secret = tenant_secret(redis_client, "datateam")
    body = verify_webhook(delivered[0]["body"], headers, secret)
    assert body["id"] == batch.id and body["status"] == "completed"
    assert body["counts"]["succeeded"] == len(SHARED_IMAGES)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(delivered[0]["body"].replace("completed", "canceled"), headers, secret)

    other = Client(web, new_key(redis_client, tenant="someone-else"))
    with pytest.raises(ApiError) as hidden:
        other.get_batch(batch.id)
    assert hidden.value.status == 404  # another tenant's batch is as absent as one that never was
