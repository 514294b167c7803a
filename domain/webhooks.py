"""Webhooks per the Standard Webhooks spec: events, messages, signatures, and the retry schedule.

A job's event becomes a *message* (:class:`Message`; its id is the
``webhook-id`` every attempt carries, so receivers can drop duplicates),
written by the job's state move itself with an entry in the outbox
(``stores/outbox.py``), and queued for delivery (``stores/webhooks.py``). A
worker makes the attempts (``workers/webhook_delivery.py``). What a move
announces, the signature, the retry schedule and the ``Retry-After`` reading
are here, pure functions all.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from standardwebhooks.webhooks import Webhook

from domain import keys
from domain.documents import job_document
from domain.records import JobRecord, JobState
from domain.schemas import DEFAULT_JOB_EVENTS, JOB_EVENTS

# The event each state a job moves into announces (the move itself writes its message: stores/outbox.py).
# The events themselves, and those a webhook that names none gets, are the request's (domain/schemas.py).
EVENT_OF_STATE = {
    JobState.RUNNING: "job.started",
    JobState.SUCCEEDED: "job.succeeded",
    JobState.FAILED: "job.failed",
    JobState.CANCELED: "job.canceled",
    JobState.EXPIRED: "job.expired",
}
assert tuple(EVENT_OF_STATE.values()) == JOB_EVENTS  # every event a request may name is announced
DEFAULT_TTL_S = 7 * 24 * 3600  # a message's lifetime when its subject has no TTL to follow
# batch.completed's message id is a name-based UUID of the batch's id: whoever queues it, it is one message.
BATCH_MESSAGE_NAMESPACE = uuid.UUID("5c0b7a52-8d1e-4f57-9a3e-6f2d0c1b9e47")
USER_AGENT = "maskq-webhooks/1"
DISABLED_URLS = keys.WEBHOOK_DISABLED_URLS


@dataclass
class Message:
    """One event for one job, delivered (and retried) to one URL under one ``webhook-id``."""

    id: str
    job_id: str
    tenant: str
    event: str
    url: str
    body: str
    status: str
    generation: int
    created_at: float
    expires_at: float
    next_attempt_at: float | None = None
    # A job.started's record as the move left it (JSON [field, value, …]): its body is built from it.
    snapshot: str | None = None

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> Message:
        data = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            id=data["id"],
            job_id=data["job_id"],
            tenant=data["tenant"],
            event=data["event"],
            url=data["url"],
            body=data.get("body", ""),
            status=data["status"],
            generation=int(data.get("generation", 0)),
            created_at=float(data["created_at"]),
            expires_at=float(data["expires_at"]),
            next_attempt_at=float(data["next_attempt_at"]) if data.get("next_attempt_at") else None,
            snapshot=data.get("snapshot"),
        )


def sign(secret: str, message_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt (HMAC-SHA256 over ``id.timestamp.body``)."""
    signature = Webhook(secret).sign(message_id, datetime.fromtimestamp(timestamp, tz=UTC), body)
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def wanted_events(record: JobRecord) -> tuple[str, tuple[str, ...]] | None:
    """``(url, events)`` of the job's webhook, or None when it has none."""
    hook = record.request.webhook
    if hook is None:
        return None
    return hook.url, tuple(hook.events) or DEFAULT_JOB_EVENTS


def dumps(document: dict[str, Any]) -> str:
    # The same serialisation as the API's responses, so a body equals what GET returns.
    return json.dumps(document, ensure_ascii=False)


def batch_message_id(batch_id: str) -> str:
    """The one message id (``webhook-id``) of batch ``batch_id``'s ``batch.completed``."""
    return f"msg_{uuid.uuid5(BATCH_MESSAGE_NAMESPACE, f'batch.completed/{batch_id}').hex}"


def started_body(snapshot: str) -> str:
    """A ``job.started`` body: the job as its start left it (``Message.snapshot``, written by the move)."""
    flat = json.loads(snapshot)
    record = JobRecord.from_hash({flat[i].encode(): flat[i + 1].encode() for i in range(0, len(flat), 2)})
    return dumps(job_document(record))


def next_pause(
    attempt: int, schedule: tuple[float, ...], jitter: float, retry_after: float | None, retry_after_max: float
) -> float | None:
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
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))
