"""Queuing webhook deliveries: the fast path after a move, the outbox's upkeep, redeliveries, tenants' secrets.

When a job's record moves, the event the job asked for becomes a *message*
in Redis (its id is the ``webhook-id`` every attempt carries, so receivers
can drop duplicates) with an entry in the outbox, both written by the move
itself (``stores/outbox.py``). The mover then queues a delivery task on the
webhook queue (the fast path: ``JobStore.on_moved`` → :class:`JobEvents` →
:func:`queue_deliveries`); if it dies or fails first, a worker's upkeep queues
it (:func:`drain_outbox`), under the same id. ``batch.completed`` goes the same
way, under an id derived from the batch (``domain.webhooks.batch_message_id``).
A worker makes the attempts (``workers/webhook_delivery.py``); events,
signatures and the retry schedule are ``domain/webhooks.py``. Nothing here
ever touches the job's record: delivery cannot fail a job.
"""

from __future__ import annotations

import base64
import logging
import secrets
from typing import Any, cast

import redis
from pydantic import SecretStr

from config.task_names import DELIVER_WEBHOOK, WEBHOOK_QUEUE
from domain import keys
from domain.batches import document as batch_document
from domain.documents import job_document
from domain.records import JobRecord, JobState
from domain.schemas import DEFAULT_BATCH_EVENTS
from domain.webhooks import DEFAULT_TTL_S, DISABLED_URLS, batch_message_id, dumps, wanted_events
from stores.batches import BatchStore
from stores.delivery_log import DeliveryLog
from stores.jobs import JobStore
from stores.outbox import Outbox

log = logging.getLogger(__name__)

secret_key = keys.webhook_secret


def tenant_secret(client: redis.Redis, tenant: str, configured: SecretStr | None = None) -> str:
    """The tenant's ``whsec_`` secret: ``configured`` (the default tenant's setting), else the stored one.

    With none stored, one is generated and stored; ``SET NX`` makes every
    process agree on the first one written.
    """
    if configured is not None:
        return configured.get_secret_value()
    stored = cast("bytes | None", client.get(secret_key(tenant)))  # (clients here answer bytes)
    if stored is None:
        fresh = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        client.set(secret_key(tenant), fresh, nx=True)
        stored = cast(bytes, client.get(secret_key(tenant)))  # set now, by this call or another
    return stored.decode()


def notify(job: JobRecord | str, event: str, client: redis.Redis, celery_app: Any = None) -> str | None:
    """Write (with its outbox entry) and queue a delivery of ``event`` for ``job`` if its webhook asked for it.

    For an event no state move announces: a job created already ended (a result-cache hit). A move's
    own events are written by the move (see the module's docstring). Returns the message id. It never
    raises, because a notification must not break the path that ended the job. ``job.started`` carries
    the job as it is now; an ending event's body is built at its first attempt (the job no longer
    changes then), so no storage is touched here.
    """
    try:
        record = job if isinstance(job, JobRecord) else JobStore(client, DEFAULT_TTL_S).get(job)
        hook = wanted_events(record) if record is not None else None
        if record is None or hook is None or event not in hook[1]:
            return None
        body = dumps(job_document(record)) if event == "job.started" else ""
        ttl = client.ttl(JobStore.key(record.id))
        message = DeliveryLog(client).create(record, event, hook[0], body, ttl if ttl > 0 else DEFAULT_TTL_S)
        queue_deliveries(client, [message.id], celery_app)
        log.info("job %s: %s queued for delivery as %s", record.id, event, message.id)
        return message.id
    except Exception:
        log.exception("job %s: could not queue the %s webhook", getattr(job, "id", job), event)
        return None


def notify_batches(batches: BatchStore, base_url: str, celery_app: Any = None) -> list[str]:
    """Queue the ``batch.completed`` webhook of every batch whose last job has ended; return the message ids.

    Each due batch is taken under a lease (stores/batches.py). Its message has a fixed id
    (``domain.webhooks.batch_message_id``) and is written once, with its outbox entry: a caller whose lease ran out
    under it, or that runs beside another, finds the message written and leaves it to its outbox entry;
    one that dies after writing it leaves the entry to a worker's upkeep. One event, one id.
    """
    queued = []
    for batch_id in batches.take_due_events():
        batch = batches.get(batch_id)
        hook = (batch.webhook or {}) if batch is not None else {}
        if batch is not None and hook.get("url") and "batch.completed" in (hook.get("events") or DEFAULT_BATCH_EVENTS):
            entries = batches.job_entries(batch_id)
            statuses = batches.statuses([job_id for job_id, _ in entries])
            body = dumps(batch_document(batch, entries, statuses, base_url))
            ttl = batches.redis.ttl(keys.batch(batch_id))
            message = DeliveryLog(batches.redis).create_for(
                batch_id,
                batch.tenant,
                "batch.completed",
                hook["url"],
                body,
                ttl if ttl > 0 else DEFAULT_TTL_S,
                message_id=batch_message_id(batch_id),
            )
            if message is not None:
                queued += queue_deliveries(batches.redis, [message.id], celery_app)
                log.info("batch %s: batch.completed queued for delivery as %s", batch_id, message.id)
        batches.event_queued(batch_id)
    return queued


def queue_deliveries(client: redis.Redis, message_ids: list[str], celery_app: Any = None) -> list[str]:
    """Queue the first attempt of each message, then mark its outbox entry done; return the ids queued.

    Never raises: a message that could not be queued keeps its outbox entry, which a worker's upkeep
    queues once its lease runs out. A process that dies between queuing and marking leaves the entry too:
    the message is queued again under the same id, and an attempt finds it delivered already, or its
    receiver drops the duplicate by ``webhook-id``.
    """
    entries, queued = Outbox(client), []
    for message_id in message_ids:
        try:
            _app(celery_app).send_task(DELIVER_WEBHOOK, args=[message_id, 1, 0, None], queue=WEBHOOK_QUEUE)
            entries.sent(message_id)
            queued.append(message_id)
        except Exception:
            log.exception("webhook message %s: not queued now; the outbox keeps it for upkeep", message_id)
    return queued


def drain_outbox(client: redis.Redis, celery_app: Any = None, most: int = 100) -> list[str]:
    """Queue the messages whose outbox entry outlived its lease (their writer died or could not queue them)."""
    queued = queue_deliveries(client, Outbox(client).take(most=most), celery_app)
    if queued:
        log.info("webhooks: %d message(s) queued from the outbox: %s", len(queued), queued[:5])
    return queued


class JobEvents:
    """A ``JobStore.on_moved`` hook, the fast path: queues the webhook message the move wrote, if any."""

    def __init__(self, client: redis.Redis, celery_app: Any = None) -> None:
        self.client = client
        self.celery_app = celery_app

    def __call__(self, job_id: str, before: JobState | None, to: JobState, message_id: str | None = None) -> None:
        if message_id is not None:
            queue_deliveries(self.client, [message_id], self.celery_app)


def redeliver(client: redis.Redis, job_id: str, message_id: str | None = None, celery_app: Any = None) -> list[str]:
    """Send the job's failed (or disabled) deliveries again, from the start of the schedule.

    A manual redelivery re-enables a URL that a 410 disabled. Returns the
    ids of the messages queued again.
    """
    deliveries = DeliveryLog(client)
    queued = []
    for message in deliveries.for_job(job_id):
        if message_id not in (None, message.id) or message.status not in ("failed", "disabled"):
            continue
        client.hdel(DISABLED_URLS, message.url)
        generation = deliveries.restart(message.id)
        _app(celery_app).send_task(DELIVER_WEBHOOK, args=[message.id, 1, generation, None], queue=WEBHOOK_QUEUE)
        queued.append(message.id)
    return queued


def _app(celery_app: Any) -> Any:
    if celery_app is not None:
        return celery_app
    from celery import current_app

    return current_app
