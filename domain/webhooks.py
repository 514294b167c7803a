"""Webhooks per the Standard Webhooks spec: events, signatures, and queuing a delivery.

When a job's record moves (``JobStore.on_moved`` → :class:`JobEvents`), the
event the job asked for becomes a *message* in Redis (its id is the
``webhook-id`` every attempt carries, so receivers can drop duplicates) and a
``maskq.deliver_webhook`` task on the ``webhooks`` queue. A worker makes the
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
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import redis
from standardwebhooks.webhooks import Webhook

from config.celery import WEBHOOK_QUEUE
from domain import keys
from domain.batches import BATCH_EVENTS, BatchStore, document as batch_document
from domain.delivery_log import DeliveryLog
from domain.records import JobRecord, JobState, JobStore

log = logging.getLogger(__name__)

EVENTS = ("job.started", "job.succeeded", "job.failed", "job.canceled", "job.expired")
EVENT_OF_STATE = {
    JobState.RUNNING: "job.started", JobState.SUCCEEDED: "job.succeeded", JobState.FAILED: "job.failed",
    JobState.CANCELED: "job.canceled", JobState.EXPIRED: "job.expired",
}
DEFAULT_EVENTS = ("job.succeeded", "job.failed")
DEFAULT_TTL_S = 7 * 24 * 3600
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
    hook = (record.request or {}).get("webhook")
    if not hook or not hook.get("url"):
        return None
    return hook["url"], tuple(hook.get("events") or DEFAULT_EVENTS)


def dumps(document: dict) -> str:
    # The same serialisation as the API's responses, so a body equals what GET returns.
    return json.dumps(document, ensure_ascii=False)


def notify(job: JobRecord | str, event: str, client: redis.Redis, celery_app=None) -> str | None:
    """Queue a delivery of ``event`` for ``job`` if its webhook asked for it; return the message id.

    Safe to call from anywhere a record moved (web process, worker, the
    scheduler): it never raises, because a notification must not break the
    path that ended the job. ``job.started`` carries the job as it is now;
    an ending event's body is built at its first attempt (the job no longer
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
        _app(celery_app).send_task(DELIVER_WEBHOOK, args=[message.id, 1, 0, None], queue=WEBHOOK_QUEUE)
        log.info("job %s: %s queued for delivery as %s", record.id, event, message.id)
        return message.id
    except Exception:
        log.exception("job %s: could not queue the %s webhook", getattr(job, "id", job), event)
        return None


def notify_batches(batches: BatchStore, base_url: str, celery_app=None) -> list[str]:
    """Queue the ``batch.completed`` webhook of every batch whose last job has ended; return the message ids.

    Each due batch is taken under a lease (domain/batches.py), so two processes never both queue it, and
    one that dies before queuing it leaves it to the next caller once the lease runs out.
    """
    queued = []
    for batch_id in batches.take_due_events():
        batch = batches.get(batch_id)
        hook = (batch.webhook or {}) if batch is not None else {}
        if hook.get("url") and "batch.completed" in (hook.get("events") or BATCH_EVENTS):
            entries = batches.job_entries(batch_id)
            statuses = batches.statuses([job_id for job_id, _ in entries])
            body = dumps(batch_document(batch, entries, statuses, base_url))
            ttl = batches.redis.ttl(keys.batch(batch_id))
            message = DeliveryLog(batches.redis).create_for(batch_id, batch.tenant, "batch.completed", hook["url"],
                                                            body, ttl if ttl > 0 else DEFAULT_TTL_S)
            _app(celery_app).send_task(DELIVER_WEBHOOK, args=[message.id, 1, 0, None], queue=WEBHOOK_QUEUE)
            log.info("batch %s: batch.completed queued for delivery as %s", batch_id, message.id)
            queued.append(message.id)
        batches.event_queued(batch_id)
    return queued


class JobEvents:
    """A ``JobStore.on_moved`` hook: every state a record moves into becomes its webhook event."""

    def __init__(self, client: redis.Redis, celery_app=None):
        self.client = client
        self.celery_app = celery_app

    def __call__(self, job_id: str, before: JobState | None, to: JobState) -> None:
        event = EVENT_OF_STATE.get(to)
        if event is not None:
            notify(job_id, event, self.client, self.celery_app)


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
