"""Nothing lost, nothing under two ids: webhook messages go through the outbox (stores/outbox.py).

Each test builds what a process that died at the worst moment leaves behind
(a job moved but its delivery never queued; a delivery queued but never
marked so; a batch's event taken by two notifiers at once), on a Redis of
its own, then starts a real worker whose upkeep must finish the job: the
real receiver gets each event once, under one ``webhook-id``.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid

import pytest
import redis
from standardwebhooks.webhooks import Webhook

from config.celery import create_celery
from config.task_names import WEBHOOK_QUEUE
from domain import keys
from domain.records import JobRecord
from domain.webhooks import batch_message_id
from storage import open_storage
from stores.batches import BatchStore
from stores.delivery_log import DeliveryLog
from stores.jobs import JobStore
from stores.outbox import LEASE_S, Outbox
from stores.webhooks import JobEvents, drain_outbox, notify_batches, tenant_secret
from tests.conftest import free_port, image_bytes
from tests.integration.test_batches import TEXT, post_batch
from tests.integration.webhook_receiver import Receiver

BASE_URL = "http://127.0.0.1:8000"  # where the workers' file links point (no public_url: host:port)
QUIET_S = 3  # three upkeep ticks: time enough for any second delivery to show


@pytest.fixture
def receiver(tmp_path):
    started = Receiver(free_port(), tmp_path).start()
    yield started
    started.stop()


def succeeded_job(isolated, url: str, on_moved=None) -> tuple[str, str]:
    """A job with a webhook, started and succeeded by a mover that queues nothing (unless ``on_moved``
    does): ``(job id, the id of the job.succeeded message its move wrote)``."""
    job_id = uuid.uuid4().hex
    prefix = keys.job_prefix("default", job_id)
    open_storage(isolated.settings()).put(prefix + "result.json", json.dumps({"instances": []}).encode())
    jobs = JobStore(isolated.redis, 3600, on_moved=on_moved)
    jobs.create(
        JobRecord(
            id=job_id,
            tenant="default",
            lane="default",
            model="text-regions",
            input_key=prefix + "input.jpg",
            image_sha256="",
            width=8,
            height=8,
            request={"webhook": {"url": url}},
        )
    )
    assert jobs.start(job_id, "v1", worker="a-process-that-dies:1")
    assert jobs.succeed(job_id, prefix + "result.json", 0, fence="a-process-that-dies:1")
    [message] = DeliveryLog(isolated.redis).for_job(job_id)
    assert message.event == "job.succeeded" and message.status == "pending"
    return job_id, message.id


def as_if_the_lease_ran_out(client: redis.Redis, message_id: str) -> None:
    assert client.zscore(keys.WEBHOOK_OUTBOX, message_id) > time.time()  # held by its writer for a while
    client.zadd(keys.WEBHOOK_OUTBOX, {message_id: time.time() - 1})


def queued_message_ids(client: redis.Redis) -> list[str]:
    """The message ids of the delivery tasks waiting on the webhooks queue (Celery's message body: args first)."""
    return [json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0] for raw in client.lrange(WEBHOOK_QUEUE, 0, -1)]


def verified(isolated, request: dict) -> dict:
    secret = tenant_secret(isolated.redis, "default", isolated.settings().webhook_secret)
    return Webhook(secret).verify(request["body"], request["headers"])


def test_a_job_whose_mover_died_before_queuing_its_webhook_gets_job_succeeded_from_upkeep_once(isolated, receiver):
    job_id, message_id = succeeded_job(isolated, receiver.url)  # the move wrote the message; nothing queued it
    assert Outbox(isolated.redis).entries()[0][0] == message_id and isolated.redis.llen(WEBHOOK_QUEUE) == 0
    as_if_the_lease_ran_out(isolated.redis, message_id)
    isolated.worker()  # its upkeep finds the entry
    (request,) = receiver.wait_for(1)
    time.sleep(QUIET_S)
    assert len(receiver.received()) == 1
    assert request["headers"]["webhook-id"] == message_id and request["headers"]["maskq-event"] == "job.succeeded"
    client = isolated.client()
    assert verified(isolated, request) == client.get(f"/v1/jobs/{job_id}", base_url=BASE_URL).get_json()
    [message] = DeliveryLog(isolated.redis).for_job(job_id)
    assert message.status == "succeeded" and len(DeliveryLog(isolated.redis).attempts(message_id)) == 1
    assert Outbox(isolated.redis).entries() == []


def test_a_crash_between_queuing_and_marking_sent_queues_the_same_message_id_again(isolated, receiver, monkeypatch):
    celery = create_celery(isolated.settings())

    def crash(self, message_id):  # the queuing process dies right after the task went out
        raise SystemError("killed before marking the entry sent")

    monkeypatch.setattr(Outbox, "sent", crash)
    job_id, message_id = succeeded_job(isolated, receiver.url, on_moved=JobEvents(isolated.redis, celery))
    assert queued_message_ids(isolated.redis) == [message_id]  # the fast path queued it...
    assert [m for m, _ in Outbox(isolated.redis).entries()] == [message_id]  # ...and never marked it
    monkeypatch.undo()

    as_if_the_lease_ran_out(isolated.redis, message_id)
    assert drain_outbox(isolated.redis, celery) == [message_id]  # what every worker's upkeep runs
    assert queued_message_ids(isolated.redis) == [message_id, message_id]  # queued again under the same id
    assert Outbox(isolated.redis).entries() == [] and drain_outbox(isolated.redis, celery) == []

    isolated.worker()
    (_request,) = receiver.wait_for(1)
    time.sleep(QUIET_S)
    assert [r["headers"]["webhook-id"] for r in receiver.received()] == [message_id]  # the second found it done
    [message] = DeliveryLog(isolated.redis).for_job(job_id)
    assert message.id == message_id and message.status == "succeeded"


def test_batch_completed_is_one_message_under_an_id_from_the_batch_however_many_notify_it(isolated, receiver):
    client = isolated.client()
    hook = {"url": receiver.url, "events": ["batch.completed"]}
    batch = post_batch(
        client,
        [("en.jpg", image_bytes("en.jpg")), ("latin.jpg", image_bytes("latin.jpg"))],
        request={**TEXT, "webhook": hook},
    ).get_json()
    jobs = isolated.jobs()
    for job_id in (j["id"] for j in batch["jobs"]):  # no worker: the jobs end here, the last completes the batch
        assert jobs.start(job_id, "v1", worker="test:1") and jobs.succeed(job_id, "r", 1, fence="test:1")

    # The web after a cancel and a worker's upkeep, at the same moment, each with its own connection.
    settings, start, results = isolated.settings(), threading.Barrier(2), []

    def notifier() -> None:
        store = BatchStore(redis.Redis.from_url(isolated.server.url), JobStore(isolated.redis, 3600))
        start.wait()
        results.append(notify_batches(store, BASE_URL, create_celery(settings)))

    threads = [threading.Thread(target=notifier) for _ in range(2)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    expected = batch_message_id(batch["id"])
    assert sorted(results) == [[], [expected]]
    # A notifier whose lease ran out under it (it stalled, or died before marking the event queued): the
    # next one finds the message written, and writes and queues no second one.
    isolated.redis.zadd(keys.BATCHES_UNNOTIFIED, {batch["id"]: time.time() - 1})
    assert notify_batches(BatchStore(isolated.redis, jobs), BASE_URL, create_celery(settings)) == []
    assert queued_message_ids(isolated.redis) == [expected]
    assert [m.id for m in DeliveryLog(isolated.redis).for_job(batch["id"])] == [expected]

    isolated.worker()
    (request,) = receiver.wait_for(1)
    time.sleep(QUIET_S)
    assert len(receiver.received()) == 1 and request["headers"]["webhook-id"] == expected
    assert request["headers"]["maskq-event"] == "batch.completed"
    assert verified(isolated, request)["id"] == batch["id"]


def test_an_outbox_entry_taken_but_never_confirmed_comes_back_once_its_lease_runs_out(isolated, receiver):
    _, message_id = succeeded_job(isolated, receiver.url)
    entries = Outbox(isolated.redis)
    assert entries.take() == []  # its writer holds it
    now = time.time() + LEASE_S + 1
    assert entries.take(now=now) == [message_id]  # the writer's lease ran out: an upkeep takes it...
    assert entries.take(now=now) == []  # ...and holds it in turn
    assert entries.take(now=now + LEASE_S + 1) == [message_id]  # that taker died too: it comes back
    entries.sent(message_id)
    assert entries.take(now=now + 10 * LEASE_S) == []
