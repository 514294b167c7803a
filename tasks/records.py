"""The service's own job record: one Redis hash per job, with a TTL.

Celery's result state cannot tell "pending" from "unknown id", so the record
is the truth about a job. Every state change goes through one Lua script that
checks the state it leaves, so two processes cannot both move a job (a
cancel racing a start, a redelivered job that already succeeded), and that
publishes the change for long-polling readers.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import StrEnum

import redis


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"

    @property
    def ended(self) -> bool:
        return self in ENDED


ENDED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED, JobState.EXPIRED})

_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return false end
if not string.find(',' .. ARGV[3] .. ',', ',' .. current .. ',', 1, true) then
  return {0, current}
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], unpack(ARGV, 4))
redis.call('PUBLISH', ARGV[1], ARGV[2])
return {1, current}
"""


@dataclass
class JobRecord:
    """What the service knows about one job; ``request`` is the validated request as JSON-able data."""

    id: str
    tenant: str
    lane: str
    model: str
    input_key: str
    image_sha256: str
    width: int
    height: int
    request: dict = field(default_factory=dict)
    status: JobState = JobState.QUEUED
    model_version: str = ""
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    result_key: str | None = None
    instances: int | None = None
    error: dict | None = None
    attempts: int = 0
    cached: bool = False

    _JSON_FIELDS = ("request", "error")

    def to_hash(self) -> dict[str, str]:
        out = {}
        for key, value in asdict(self).items():
            if value is None:
                continue
            out[key] = json.dumps(value) if key in self._JSON_FIELDS or isinstance(value, bool) else str(value)
        return out

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> "JobRecord":
        data = {k.decode(): v.decode() for k, v in raw.items()}
        kwargs: dict = {}
        for name, f in cls.__dataclass_fields__.items():
            if name not in data:
                continue
            value = data[name]
            if name in cls._JSON_FIELDS or f.type == "bool":
                kwargs[name] = json.loads(value)
            elif f.type in ("int", "int | None"):
                kwargs[name] = int(value)
            elif f.type in ("float", "float | None"):
                kwargs[name] = float(value)
            elif name == "status":
                kwargs[name] = JobState(value)
            else:
                kwargs[name] = value
        return cls(**kwargs)

    def document(self, result: dict | None = None) -> dict:
        """The job as ``GET /v1/jobs/{id}`` shows it (and as webhooks carry it)."""
        doc = {
            "id": self.id,
            "status": str(self.status),
            "lane": self.lane,
            "model": {"name": self.model, "version": self.model_version or None},
            "created_at": rfc3339(self.created_at),
            "started_at": rfc3339(self.started_at),
            "finished_at": rfc3339(self.finished_at),
            "cached": self.cached,
        }
        if result is not None:
            doc["result"] = result
        if self.error:
            doc["error"] = self.error
        return doc


def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobStore:
    """Reads and moves job records in Redis."""

    def __init__(self, client: redis.Redis, ttl_s: int):
        self.redis = client
        self.ttl_s = ttl_s
        self._transition = client.register_script(_TRANSITION)

    @staticmethod
    def key(job_id: str) -> str:
        return f"maskq:job:{job_id}"

    @staticmethod
    def channel(job_id: str) -> str:
        return f"maskq:job:{job_id}:events"

    def create(self, record: JobRecord) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key(record.id), mapping=record.to_hash())
            pipe.expire(self.key(record.id), self.ttl_s)
            pipe.execute()

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(self.key(job_id))
        return JobRecord.from_hash(raw) if raw else None

    def move(self, job_id: str, to: JobState, allowed_from: set[JobState], **fields) -> tuple[bool, JobState | None]:
        """Set ``status`` to ``to`` (and ``fields``) if the job is in one of ``allowed_from``.

        Returns ``(moved, state_before)``; ``state_before`` is None for a job that does not exist.
        """
        args = [self.channel(job_id), str(to), ",".join(sorted(allowed_from))]
        for name, value in fields.items():
            args += [name, json.dumps(value) if name in JobRecord._JSON_FIELDS else str(value)]
        answer = self._transition(keys=[self.key(job_id)], args=args)
        if not answer:
            return False, None
        return bool(answer[0]), JobState(answer[1].decode())

    def start(self, job_id: str, model_version: str) -> bool:
        """Queued (or running, when a dead worker's job is redelivered) → running."""
        moved, _ = self.move(
            job_id, JobState.RUNNING, {JobState.QUEUED, JobState.RUNNING},
            started_at=time.time(), model_version=model_version,
        )
        if moved:
            self.redis.hincrby(self.key(job_id), "attempts", 1)
        return moved

    def succeed(self, job_id: str, result_key: str, instances: int) -> bool:
        moved, _ = self.move(
            job_id, JobState.SUCCEEDED, {JobState.RUNNING},
            finished_at=time.time(), result_key=result_key, instances=instances,
        )
        return moved

    def fail(self, job_id: str, code: str, message: str) -> bool:
        moved, _ = self.move(
            job_id, JobState.FAILED, {JobState.QUEUED, JobState.RUNNING},
            finished_at=time.time(), error={"code": code, "message": message},
        )
        return moved

    def wait_until_ended(self, job_id: str, timeout: float) -> JobRecord | None:
        """The record once it has ended, or as it stands after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            pubsub.subscribe(self.channel(job_id))
            # Read after subscribing, so an end published in between is not missed.
            record = self.get(job_id)
            while record is not None and not record.status.ended:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                pubsub.get_message(timeout=min(remaining, 1.0))
                record = self.get(job_id)
        return record
