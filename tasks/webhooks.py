"""Webhooks per the Standard Webhooks spec: events, signatures, the delivery task, the delivery log.

When a job's record moves (``JobStore.on_moved`` → :class:`JobEvents`), the
event the job asked for becomes a *message* in Redis (its id is the
``webhook-id`` every attempt carries, so receivers can drop duplicates) and a
``maskq.deliver_webhook`` task on the ``webhooks`` queue. Each attempt is
signed afresh (``webhook-timestamp`` is the attempt's time), logged, and on
failure scheduled again after the next pause of ``webhook_retry_schedule_s``
(jittered; longer if the receiver's ``Retry-After`` asks). A 410 disables the
URL. Nothing here ever touches the job's record: delivery cannot fail a job.

Long pauses are taken in hops no longer than half the broker's visibility
timeout, because a Redis broker hands an ETA message that outlives that
timeout to a second worker (celery#5935).
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
import requests
from celery import shared_task
from standardwebhooks.webhooks import Webhook

from config.celery import WEBHOOK_QUEUE
from tasks.delivery_log import DeliveryLog, Message
from tasks.documents import job_document
from tasks.records import JobRecord, JobState, JobStore
from tasks.webhook_urls import ForbiddenAddress, guard_for

log = logging.getLogger(__name__)

EVENTS = ("job.started", "job.succeeded", "job.failed", "job.canceled", "job.expired")
EVENT_OF_STATE = {
    JobState.RUNNING: "job.started", JobState.SUCCEEDED: "job.succeeded", JobState.FAILED: "job.failed",
    JobState.CANCELED: "job.canceled", JobState.EXPIRED: "job.expired",
}
DEFAULT_EVENTS = ("job.succeeded", "job.failed")
DEFAULT_TTL_S = 7 * 24 * 3600
USER_AGENT = "maskq-webhooks/1"
DISABLED_URLS = "maskq:webhook:disabled"


def secret_key(tenant: str) -> str:
    return f"maskq:webhook:secret:{tenant}"


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
        _app(celery_app).send_task("maskq.deliver_webhook", args=[message.id, 1, 0, None], queue=WEBHOOK_QUEUE)
        log.info("job %s: %s queued for delivery as %s", record.id, event, message.id)
        return message.id
    except Exception:
        log.exception("job %s: could not queue the %s webhook", getattr(job, "id", job), event)
        return None


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
        _app(celery_app).send_task("maskq.deliver_webhook", args=[message.id, 1, generation, None], queue=WEBHOOK_QUEUE)
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


@shared_task(name="maskq.deliver_webhook", ignore_result=True)
def deliver_webhook(message_id: str, attempt: int = 1, generation: int = 0, not_before: float | None = None) -> None:
    from workers import process

    worker = process.current()
    settings = worker.settings
    deliveries = DeliveryLog(worker.redis)
    message = deliveries.get(message_id)
    # Gone (retention), superseded by a redelivery, or already settled: nothing to do.
    if message is None or message.generation != generation or message.status != "pending":
        return
    wait = (not_before or 0) - time.time()
    if wait > 0.005:
        _schedule(message_id, attempt, generation, not_before, wait, settings.visibility_timeout_s)
        return
    if worker.redis.hexists(DISABLED_URLS, message.url):
        deliveries.record(message, None, "not sent: a 410 answer disabled deliveries to this URL", 0)
        deliveries.settle(message, "disabled")
        return
    status, error, retry_after, permanent, started = None, None, None, False, time.monotonic()
    try:
        body = message.body or deliveries.freeze_body(message, _ending_body(message, worker))
        status, retry_after = _post(message, body, settings, worker.redis)
        if not 200 <= status < 300:
            error = f"HTTP {status}"
    except ForbiddenAddress as exc:
        error, permanent = str(exc), True
    except _JobGone as exc:
        error, permanent = str(exc), True
    except requests.RequestException as exc:
        error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a storage outage while building the body, among others: try again later
        error = f"{type(exc).__name__}: {exc}"
    deliveries.record(message, status, error, int((time.monotonic() - started) * 1000))
    if error is None:
        deliveries.settle(message, "succeeded")
        log.info("job %s: %s delivered (%s) on attempt %d", message.job_id, message.event, message.id, attempt)
    elif status == 410:
        worker.redis.hset(DISABLED_URLS, message.url, json.dumps({"at": time.time(), "message_id": message.id}))
        deliveries.settle(message, "disabled")
        log.info("job %s: %s answered 410 Gone; deliveries to it are disabled", message.job_id, message.url)
    else:
        pause = None if permanent else next_pause(attempt, settings.webhook_retry_schedule_s,
                                                   settings.webhook_retry_jitter, retry_after,
                                                   settings.webhook_retry_after_max_s)
        if pause is None:
            deliveries.settle(message, "failed")
            log.info("job %s: %s not delivered after attempt %d (%s); giving up", message.job_id, message.event,
                     attempt, error)
            return
        due = time.time() + pause
        deliveries.set_next(message, due)
        log.info("job %s: %s attempt %d failed (%s); next in %.2f s", message.job_id, message.event, attempt,
                 error, pause)
        _schedule(message_id, attempt + 1, generation, due, pause, settings.visibility_timeout_s)


class _JobGone(Exception):
    pass


def _ending_body(message: Message, worker) -> str:
    record = worker.jobs.get(message.job_id)
    if record is None:
        raise _JobGone(f"job {message.job_id} no longer exists; nothing to send")
    settings = worker.settings
    base_url = settings.public_url or f"http://{settings.host}:{settings.port}"
    return dumps(job_document(record, worker.storage, base_url))


def _post(message: Message, body: str, settings, client: redis.Redis) -> tuple[int, float | None]:
    secret = tenant_secret(client, message.tenant, settings.webhook_secret if message.tenant == "default" else None)
    headers = sign(secret, message.id, int(time.time()), body)
    # The body is the job as GET shows it; which event it reports travels beside it.
    headers.update({"content-type": "application/json", "user-agent": USER_AGENT, "maskq-event": message.event})
    with guard_for(settings.webhook_allowed_networks).session() as session:
        # No redirects: a webhook that moved must be registered again, and a redirect could lead inside.
        response = session.post(message.url, data=body.encode(), headers=headers,
                                timeout=settings.webhook_timeout_s, allow_redirects=False, stream=True)
        response.close()
    return response.status_code, retry_after_seconds(response.headers.get("retry-after"))


def _schedule(message_id: str, attempt: int, generation: int, due: float, wait: float, visibility_s: float) -> None:
    hop = max(0.0, min(wait, visibility_s / 2))
    deliver_webhook.apply_async(args=[message_id, attempt, generation, due], countdown=hop, queue=WEBHOOK_QUEUE)


def _app(celery_app):
    if celery_app is not None:
        return celery_app
    from celery import current_app

    return current_app
