"""The webhook delivery log in Redis: each message, its state, and every attempt made to deliver it.

Keys (all expire with the job's record):

- ``maskq:webhook:msg:{id}`` — a hash: job, tenant, event, URL, the body once
  fixed, ``status`` (``pending``, ``succeeded``, ``failed``, ``disabled``),
  ``generation`` (raised by a redelivery, so an older retry chain stops), and
  ``next_attempt_at``;
- ``maskq:webhook:msg:{id}:attempts`` — a list of JSON attempts: time, status
  code, error, duration;
- ``maskq:job:{job_id}:deliveries`` — the job's (or a batch's, by its id) message ids, oldest first.

Every message is written with its entry in the outbox (``stores/outbox.py``), which sees that its first
attempt gets queued even when the process that wrote it dies; a job's event messages are written by the
job's state move itself (``outbox.QUEUE_JOB_EVENT_LUA``), in the same shape as :meth:`DeliveryLog.create_for`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, cast

import redis

from domain import keys
from domain.records import JobRecord, rfc3339
from domain.webhooks import Message
from stores.outbox import Outbox

message_key = keys.webhook_message
attempts_key = keys.webhook_attempts
job_deliveries_key = keys.job_deliveries


class DeliveryLog:
    """Reads and writes webhook messages and their attempts."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def create(self, record: JobRecord, event: str, url: str, body: str, ttl_s: int) -> Message:
        message = self.create_for(record.id, record.tenant, event, url, body, ttl_s)
        assert message is not None  # a new id: always written
        return message

    def create_for(
        self, subject_id: str, tenant: str, event: str, url: str, body: str, ttl_s: int, message_id: str | None = None
    ) -> Message | None:
        """A message about job (or batch: ``batch.completed``) ``subject_id``, kept ``ttl_s``, with its outbox entry.

        ``message_id``: a fixed id (one event, one id), else a new one. None when a message of that id exists:
        its event has its message already, and its outbox entry sees it queued.
        """
        now = time.time()
        message = Message(
            id=message_id or f"msg_{uuid.uuid4().hex}",
            job_id=subject_id,
            tenant=tenant,
            event=event,
            url=url,
            body=body,
            status="pending",
            generation=0,
            created_at=now,
            expires_at=now + ttl_s,
        )
        fields = {k: str(v) for k, v in message.__dict__.items() if v is not None}
        created = Outbox(self.redis).add(message.id, fields, job_deliveries_key(subject_id), ttl_s)
        return message if created else None

    def get(self, message_id: str) -> Message | None:
        raw = cast("dict[bytes, bytes]", self.redis.hgetall(message_key(message_id)))  # (clients here answer bytes)
        return Message.from_hash(raw) if raw else None

    def for_job(self, job_id: str) -> list[Message]:
        ids = [m.decode() for m in cast("list[bytes]", self.redis.lrange(job_deliveries_key(job_id), 0, -1))]
        return [m for m in (self.get(i) for i in ids) if m is not None]

    def attempts(self, message_id: str) -> list[dict[str, Any]]:
        return [json.loads(a) for a in self.redis.lrange(attempts_key(message_id), 0, -1)]

    def record(self, message: Message, status_code: int | None, error: str | None, duration_ms: int) -> None:
        """Append one attempt to the message's log."""
        number = self.redis.llen(attempts_key(message.id)) + 1
        entry = {
            "attempt": number,
            "at": rfc3339(time.time()),
            "status_code": status_code,
            "error": error,
            "duration_ms": duration_ms,
        }
        with self.redis.pipeline() as pipe:
            pipe.rpush(attempts_key(message.id), json.dumps(entry))
            pipe.expireat(attempts_key(message.id), int(message.expires_at) + 1)
            pipe.execute()

    def settle(self, message: Message, status: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(message_key(message.id), "status", status)
            pipe.hdel(message_key(message.id), "next_attempt_at")
            pipe.execute()

    def set_next(self, message: Message, due: float) -> None:
        self.redis.hset(message_key(message.id), "next_attempt_at", str(due))

    def freeze_body(self, message: Message, body: str) -> str:
        """Keep the body built at the first attempt, so every retry sends (and signs) the same bytes."""
        self.redis.hset(message_key(message.id), "body", body)
        return body

    def restart(self, message_id: str) -> int:
        """Back to ``pending`` under a new generation; return it."""
        with self.redis.pipeline() as pipe:
            pipe.hincrby(message_key(message_id), "generation", 1)
            pipe.hset(message_key(message_id), "status", "pending")
            generation, _ = pipe.execute()
        return int(generation)

    def forget_job(self, job_id: str) -> int:
        """Delete the job's messages and their attempts; return how many messages went."""
        ids = [m.decode() for m in cast("list[bytes]", self.redis.lrange(job_deliveries_key(job_id), 0, -1))]
        doomed = [job_deliveries_key(job_id)] + [message_key(i) for i in ids] + [attempts_key(i) for i in ids]
        self.redis.delete(*doomed)
        return len(ids)

    def document(self, job_id: str) -> list[dict[str, Any]]:
        """The job's deliveries as ``GET /v1/jobs/{id}/deliveries`` shows them."""
        return [
            {
                "id": m.id,
                "event": m.event,
                "url": m.url,
                "status": m.status,
                "created_at": rfc3339(m.created_at),
                "next_attempt_at": rfc3339(m.next_attempt_at),
                "attempts": self.attempts(m.id),
            }
            for m in self.for_job(job_id)
        ]
