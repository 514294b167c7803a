"""A batch's life while it is received (issue 22, finding 9): kept alive by its fan-out, closed once that dies."""

from __future__ import annotations

import threading
import time

from domain.batches import BatchRecord
from stores.batches import BatchStore
from stores.delivery_log import DeliveryLog
from stores.jobs import JobStore
from tests.integration.helpers import small_png, wait_for
from tests.integration.test_batches import NOWHERE, post_batch


def test_worker_upkeep_seals_a_batch_whose_uploader_died_so_its_webhook_goes_out_unread(isolated):
    isolated.worker(MASKQ_BATCH_RECEIVE_TIMEOUT_S=1, MASKQ_SCHEDULER_TICK_S=0.2)
    store = BatchStore(isolated.redis, JobStore(isolated.redis, 3600))
    batch = BatchRecord(
        id=store.new_id(),
        tenant="default",
        created_at=time.time(),
        webhook={"url": NOWHERE, "events": ["batch.completed"]},
    )
    store.create(batch)
    store.will_add(batch.id, "f" * 32)  # and the uploader died before that job's record was written
    # While its fan-out still touches it, upkeep leaves it alone, however long it takes.
    until = time.monotonic() + 2.5
    while time.monotonic() < until:
        store.touch(batch.id)
        time.sleep(0.2)
        assert store.get(batch.id).sealed_at is None
    # Then it goes quiet: sealed by upkeep (no one reads it), complete at once, and its webhook queued.
    messages = wait_for(lambda: DeliveryLog(isolated.redis).for_job(batch.id), 15)
    assert [m.event for m in messages] == ["batch.completed"]
    done = store.get(batch.id)
    assert done.status == "completed" and done.sealed_at - done.touched_at > 1
    assert isolated.redis.zcard("maskq:batches:receiving") == 0


class SlowStorage:
    """The app's own storage, each put slowed down: a fan-out that takes seconds, as hundreds of images do."""

    def __init__(self, real, delay_s: float):
        self.real, self.delay_s = real, delay_s

    def put(self, key, data, content_type="application/octet-stream"):
        time.sleep(self.delay_s)
        return self.real.put(key, data, content_type)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_long_fan_out_keeps_its_batch_and_its_idempotency_key_alive(isolated):
    client = isolated.client(batch_receive_timeout_s=1, idempotency_pending_ttl_s=1)
    services = client.application.extensions["maskq"]
    services.storage = SlowStorage(services.storage, 0.25)
    images = [(f"{n}.png", small_png(n)) for n in range(14)]  # 3.5 s of fan-out: past both timeouts
    key = {"Idempotency-Key": "nightly-run"}

    def same_client():
        other = client.application.test_client()
        other.environ_base["HTTP_AUTHORIZATION"] = client.environ_base["HTTP_AUTHORIZATION"]
        return other

    answers = {}
    uploader = threading.Thread(target=lambda: answers.update(first=post_batch(same_client(), images, headers=key)))
    uploader.start()
    try:
        batch_key = wait_for(lambda: next(iter(isolated.redis.scan_iter(match="maskq:batch:" + "?" * 32)), None), 10)
        batch_id = batch_key.decode().rsplit(":", 1)[1]
        time.sleep(1.8)
        assert uploader.is_alive()  # still fanning out, well past batch_receive_timeout_s and the claim's TTL
        read = client.get(f"/v1/batches/{batch_id}").get_json()
        assert read["status"] == "receiving" and read["total"] < len(images)  # not sealed under it
        retry = post_batch(same_client(), images, headers=key)
        assert retry.status_code == 409  # the key is still held: no second batch
    finally:
        uploader.join(30)
    first = answers["first"]
    assert first.status_code == 202 and first.get_json()["total"] == len(images)
    assert first.get_json()["id"] == batch_id and first.get_json()["status"] == "running"
    replay = post_batch(same_client(), images, headers=key)
    assert replay.status_code == 200 and replay.get_json()["id"] == batch_id
    assert len(list(isolated.redis.scan_iter(match="maskq:batch:" + "?" * 32))) == 1
