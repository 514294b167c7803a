"""Webhooks per the Standard Webhooks spec: events, signatures, and queuing a delivery.

When a job's record moves, the event the job asked for becomes a *message*
in Redis (its id is the ``webhook-id`` every attempt carries, so receivers
can drop duplicates) with an entry in the outbox, both written by the move
itself (``domain/outbox.py``). The mover then queues a
``maskq.deliver_webhook`` task on the ``webhooks`` queue (the fast path:
``JobStore.on_moved`` → :class:`JobEvents` → :func:`queue_deliveries`); if it
dies or fails first, a worker's upkeep queues it (:func:`drain_outbox`),
under the same id. ``batch.completed`` goes the same way, under an id
derived from the batch (:func:`batch_message_id`). A worker makes the
attempts (``workers/webhook_delivery.py``); the retry schedule and the
``Retry-After`` reading are here, pure functions both. Nothing here ever
touches the job's record: delivery cannot fail a job.
"""
from __future__ import annotations

import base64
import json
import logging
import random
import secrets
import time
import uuid
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import redis
from standardwebhooks.webhooks import Webhook

from config.celery import WEBHOOK_QUEUE
from domain import keys
from domain.batches import BatchStore, document as batch_document
from domain import outbox
from domain.delivery_log import DeliveryLog
from domain.outbox import Outbox
from domain.records import JobRecord, JobState, JobStore
from domain.schemas import DEFAULT_BATCH_EVENTS, DEFAULT_JOB_EVENTS

log = logging.getLogger(__name__)

# Which event each move announces is decided inside the move (domain/outbox.py); these name it for Python.
# The events themselves, and those a webhook that names none gets, are the request's (domain/schemas.py).
EVENT_OF_STATE = {JobState(status): event for status, event in outbox.EVENT_OF_STATUS.items()}
DEFAULT_TTL_S = outbox.DEFAULT_TTL_S
# batch.completed's message id is a name-based UUID of the batch's id: whoever queues it, it is one message.
BATCH_MESSAGE_NAMESPACE = uuid.UUID("5c0b7a52-8d1e-4f57-9a3e-6f2d0c1b9e47")
USER_AGENT = "maskq-webhooks/1"
DISABLED_URLS = keys.WEBHOOK_DISABLED_URLS
DELIVER_WEBHOOK = "maskq.deliver_webhook"  # the Celery task that makes one attempt (tasks/deliver_webhook.py)


secret_key = keys.webhook_secret


def tenant_secret(client: redis.Redis, tenant: str, configured=None) -> str:
    """The tenant's ``whsec_`` secret: ``configured`` (the default tenant's setting), else the stored one.

    With none stored, one is generated and stored; ``SET NX`` makes every
    process agree on the first one written.
    """
    if configured is not None:
        return configured.get_secret_value()
    stored = client.get(secret_key(tenant))
    if stored is None:
        fresh = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        client.set(secret_key(tenant), fresh, nx=True)
        stored = client.get(secret_key(tenant))
    return stored.decode()


def sign(secret: str, message_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt (HMAC-SHA256 over ``id.timestamp.body``)."""
    signature = Webhook(secret).sign(message_id, datetime.fromtimestamp(timestamp, tz=timezone.utc), body)
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def wanted_events(record: JobRecord) -> tuple[str, str] | None:
    """``(url, events)`` of the job's webhook, or None when it has none."""
    hook = record.request.webhook
    if hook is None:
        return None
    return hook.url, tuple(hook.events) or DEFAULT_JOB_EVENTS


def dumps(document: dict) -> str:
    # The same serialisation as the API's responses, so a body equals what GET returns.
    return json.dumps(document, ensure_ascii=False)


def notify(job: JobRecord | str, event: str, client: redis.Redis, celery_app=None) -> str | None:
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
        if hook is None or event not in hook[1]:
            return None
        body = dumps(record.document()) if event == "job.started" else ""
        ttl = client.ttl(JobStore.key(record.id))
        message = DeliveryLog(client).create(record, event, hook[0], body, ttl if ttl > 0 else DEFAULT_TTL_S)
        queue_deliveries(client, [message.id], celery_app)
        log.info("job %s: %s queued for delivery as %s", record.id, event, message.id)
        return message.id
    except Exception:
        log.exception("job %s: could not queue the %s webhook", getattr(job, "id", job), event)
        return None


def batch_message_id(batch_id: str) -> str:
    """The one message id (``webhook-id``) of batch ``batch_id``'s ``batch.completed``."""
    return f"msg_{uuid.uuid5(BATCH_MESSAGE_NAMESPACE, f'batch.completed/{batch_id}').hex}"


def notify_batches(batches: BatchStore, base_url: str, celery_app=None) -> list[str]:
    """Queue the ``batch.completed`` webhook of every batch whose last job has ended; return the message ids.

    Each due batch is taken under a lease (domain/batches.py). Its message has a fixed id
    (:func:`batch_message_id`) and is written once, with its outbox entry: a caller whose lease ran out
    under it, or that runs beside another, finds the message written and leaves it to its outbox entry;
    one that dies after writing it leaves the entry to a worker's upkeep. One event, one id.
    """
    queued = []
    for batch_id in batches.take_due_events():
        batch = batches.get(batch_id)
        hook = (batch.webhook or {}) if batch is not None else {}
        if hook.get("url") and "batch.completed" in (hook.get("events") or DEFAULT_BATCH_EVENTS):
            entries = batches.job_entries(batch_id)
            statuses = batches.statuses([job_id for job_id, _ in entries])
            body = dumps(batch_document(batch, entries, statuses, base_url))
            ttl = batches.redis.ttl(keys.batch(batch_id))
            message = DeliveryLog(batches.redis).create_for(batch_id, batch.tenant, "batch.completed", hook["url"],
                                                            body, ttl if ttl > 0 else DEFAULT_TTL_S,
                                                            message_id=batch_message_id(batch_id))
            if message is not None:
                queued += queue_deliveries(batches.redis, [message.id], celery_app)
                log.info("batch %s: batch.completed queued for delivery as %s", batch_id, message.id)
        batches.event_queued(batch_id)
    return queued


def queue_deliveries(client: redis.Redis, message_ids: list[str], celery_app=None) -> list[str]:
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


def drain_outbox(client: redis.Redis, celery_app=None, most: int = 100) -> list[str]:
    """Queue the messages whose outbox entry outlived its lease (their writer died or could not queue them)."""
    queued = queue_deliveries(client, Outbox(client).take(most=most), celery_app)
    if queued:
        log.info("webhooks: %d message(s) queued from the outbox: %s", len(queued), queued[:5])
    return queued


def started_body(snapshot: str) -> str:
    """A ``job.started`` body: the job as its start left it (``Message.snapshot``, written by the move)."""
    flat = json.loads(snapshot)
    record = JobRecord.from_hash({flat[i].encode(): flat[i + 1].encode() for i in range(0, len(flat), 2)})
    return dumps(record.document())


class JobEvents:
    """A ``JobStore.on_moved`` hook, the fast path: queues the webhook message the move wrote, if any."""

    def __init__(self, client: redis.Redis, celery_app=None):
        self.client = client
        self.celery_app = celery_app

    def __call__(self, job_id: str, before: JobState | None, to: JobState, message_id: str | None = None) -> None:
        if message_id is not None:
            queue_deliveries(self.client, [message_id], self.celery_app)


def redeliver(client: redis.Redis, job_id: str, message_id: str | None = None, celery_app=None) -> list[str]:
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


def next_pause(attempt: int, schedule: tuple[float, ...], jitter: float, retry_after: float | None,
               retry_after_max: float) -> float | None:
    """Seconds before attempt ``attempt + 1``, or None when the schedule is spent."""
    if attempt > len(schedule):
        return None
    pause = schedule[attempt - 1] * (1 + random.uniform(-jitter, jitter))
    if retry_after is not None:
        pause = max(pause, min(retry_after, retry_after_max))
    return pause


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def _app(celery_app):
    if celery_app is not None:
        return celery_app
    from celery import current_app

    return current_app
