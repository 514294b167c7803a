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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum

import redis

from domain import job_metrics, keys, outbox
from domain import cancel_after
from domain.job_metrics import JobMetrics
from domain.schemas import JobRequest


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

_TRANSITION = keys.lua("""
-- KEYS[1]: the job's hash. ARGV: channel, new status, allowed current statuses, now, fence (the process
-- whose run this move ends, or ''), field/value pairs.
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return false end
if not string.find(',' .. ARGV[3] .. ',', ',' .. current .. ',', 1, true) then
  return {0, current}
end
-- A run that another run took over (recovery put it back, another process started it) ends nothing.
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[5] then
  return {0, current}
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], unpack(ARGV, 6))
-- The job's own count of moves: the ids of its live event stream (webapp/events.py).
redis.call('HINCRBY', KEYS[1], 'moves', 1)
-- Keep the lane index (queue positions, lane depths) and the deadline index in step with the record.
local id = redis.call('HGET', KEYS[1], 'id')
local lane = redis.call('HGET', KEYS[1], 'lane')
if current == 'queued' and ARGV[2] ~= 'queued' then
  redis.call('ZREM', '${lane}' .. lane, id)
  redis.call('ZREM', '${deadlines}', id)
  redis.call('SREM', '${promoted}', id)
elseif ARGV[2] == 'queued' then
  redis.call('ZADD', '${lane}' .. lane, ARGV[4], id)
end
-- And the index of running jobs, which recovery reads (workers/recovery.py).
if ARGV[2] == 'running' then
  redis.call('ZADD', '${running}', ARGV[4], id)
elseif current == 'running' then
  redis.call('ZREM', '${running}', id)
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
-- A job of a batch that ends leaves the batch's pending set; the last one to leave a sealed batch
-- completes it, in this same step, so a crash cannot lose the completion (domain/batches.py).
local batch = redis.call('HGET', KEYS[1], 'batch')
if batch and (ARGV[2] == 'succeeded' or ARGV[2] == 'failed' or ARGV[2] == 'canceled' or ARGV[2] == 'expired')
    and redis.call('SREM', '${batch}' .. batch .. ':pending', id) == 1
    and redis.call('SCARD', '${batch}' .. batch .. ':pending') == 0
    and redis.call('HEXISTS', '${batch}' .. batch, 'sealed_at') == 1
    and redis.call('HSETNX', '${batch}' .. batch, 'completed_at', ARGV[4]) == 1 then
  redis.call('ZADD', '${batches_unnotified}', ARGV[4], batch)
end
-- The move's webhook event, if the job's webhook wants it: its message and outbox entry, in this same step,
-- so a process that dies right after the move cannot lose it (domain/outbox.py).
""" + outbox.QUEUE_JOB_EVENT_LUA + job_metrics.COUNT_MOVE_LUA + """
return {1, current, webhook_message}
""")


class StoredRequest:
    """``JobRecord.request``: the job's typed :class:`JobRequest`, parsed from the record at most once.

    The web parses a submission once and gives the record the :class:`JobRequest` itself. A record read from
    Redis holds the request's JSON as stored, and turns it into the typed request the first time it is
    asked for (a record read only to show its status never parses it); that object is kept, so every later
    reader (job runner, pipeline, adapter) gets the same one. A dict (a record built by hand, the form of
    the request the previous version kept) is taken too. Written back, a request never parsed is its own
    text, byte for byte, and a typed one is ``json.dumps(model_dump(mode="json"))``: the stored form the
    previous version wrote and read, and that the transition script's webhook step reads (domain/outbox.py).
    """

    def __set_name__(self, owner, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, record, owner=None) -> JobRequest:
        if record is None:
            return EMPTY_REQUEST  # the dataclass field's default
        value = record.__dict__[self.slot]
        if not isinstance(value, JobRequest):
            value = (JobRequest.model_validate_json(value) if isinstance(value, (str, bytes))
                     else JobRequest.model_validate(value))
            record.__dict__[self.slot] = value
        return value

    def __set__(self, record, value: JobRequest | dict | str) -> None:
        record.__dict__[self.slot] = value

    def stored(self, record) -> str:
        """The request as the record's hash keeps it."""
        value = record.__dict__[self.slot]
        if isinstance(value, str):
            return value
        if isinstance(value, JobRequest):
            value = value.model_dump(mode="json")
        return json.dumps(value)


EMPTY_REQUEST = JobRequest()


@dataclass
class JobRecord:
    """What the service knows about one job; ``request`` is its typed request (:class:`StoredRequest`)."""

    id: str
    tenant: str
    lane: str
    model: str
    input_key: str
    image_sha256: str
    width: int
    height: int
    request: JobRequest = StoredRequest()
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
    deadline_at: float | None = None
    last_error: dict | None = None
    # Set when the requested model could not be loaded and its fallback ran the job instead:
    # {"name", "version", "reason"} of the model actually used (models/catalog.py, ModelChoice).
    model_used: dict | None = None
    # The result cache's digest of this job (domain/result_cache.py), and the identical job in flight
    # whose result this one waits for, or took (a coalesced job).
    cache_key: str | None = None
    coalesced_with: str | None = None
    # The pool process ("host:pid", as in domain/fleet.py) that started the job's latest run.
    worker: str | None = None
    # When it last went back on its lane (out of memory, a lost worker): its queue wait counts from here.
    requeued_at: float | None = None
    # Seconds the run that succeeded spent in each phase (queue, load, encode, predict, store, total).
    timings: dict | None = None
    # The W3C trace context the job carries through web, worker and webhook (its traceparent).
    traceparent: str | None = None
    # The batch the job is one image of (POST /v1/batches), if any.
    batch: str | None = None
    # When the job is canceled unless it has ended (its Cancel-After: domain/cancel_after.py).
    cancel_at: float | None = None
    # How many state moves the job has made (the transition script counts them): its event ids.
    moves: int = 0
    # What the job's input is: "image" (the only media today; a record written before this field is one).
    # Its result is written by that media's writer (workers/results.py).
    media: str = "image"

    _JSON_FIELDS = ("request", "error", "last_error", "model_used", "timings")

    def to_hash(self) -> dict[str, str]:
        out = {}
        for key in self.__dataclass_fields__:
            if key == "request":
                out[key] = type(self).__dict__["request"].stored(self)
                continue
            value = getattr(self, key)
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
            if name == "request":
                kwargs[name] = value  # parsed when first asked for (StoredRequest)
            elif name in cls._JSON_FIELDS or f.type == "bool":
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
            "degraded": self.model_used is not None,
            "created_at": rfc3339(self.created_at),
            "started_at": rfc3339(self.started_at),
            "finished_at": rfc3339(self.finished_at),
            "cached": self.cached,
        }
        if self.model_used is not None:
            doc["model_used"] = {"name": self.model_used["name"], "version": self.model_used["version"]}
            doc["degraded_reason"] = self.model_used.get("reason")
        if self.coalesced_with:
            doc["coalesced_with"] = self.coalesced_with
        if self.cancel_at is not None:
            doc["cancel_at"] = rfc3339(self.cancel_at)
        if result is not None:
            doc["result"] = result
        if self.error:
            doc["error"] = self.error
        doc["metrics"] = self.metrics()
        if self.traceparent:
            doc["traceparent"] = self.traceparent
        return doc

    def metrics(self) -> dict[str, float]:
        """Seconds per phase, as Replicate's ``metrics.predict_time``: ``queue`` once started, ``total`` once
        ended, and for a job that ran to success ``load``, ``encode`` (SAM-family), ``predict``, ``store``."""
        out = dict(self.timings or {})
        if self.started_at is not None:
            out["queue"] = round(self.started_at - (self.requeued_at or self.created_at), 4)
        if self.finished_at is not None:
            out["total"] = round(self.finished_at - self.created_at, 4)
        return out


def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobStore:
    """Reads and moves job records in Redis.

    ``on_moved(job_id, state_before, state_after, message_id)``, if given, is called after every move that
    happened; ``message_id`` is the webhook message the move wrote to the outbox, or None (the fast path
    that queues it hangs on this: ``domain.webhooks.JobEvents``).
    """

    def __init__(self, client: redis.Redis, ttl_s: int, on_moved=None):
        self.redis = client
        self.ttl_s = ttl_s
        self.on_moved = on_moved
        self.metrics = JobMetrics(client)
        self._transition = client.register_script(_TRANSITION)

    key = staticmethod(keys.job)
    channel = staticmethod(keys.job_events)

    def create(self, record: JobRecord, ttl_s: int | None = None) -> None:
        """Write a new record (kept ``ttl_s``, else the store's TTL); a queued one is indexed in its lane.

        A record created already ended (a result-cache hit) is in no lane. A queued one is marked
        unsent in the same transaction: see :meth:`sent`.
        """
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key(record.id), mapping=record.to_hash())
            pipe.expire(self.key(record.id), ttl_s or self.ttl_s)
            if record.status == JobState.QUEUED:
                pipe.zadd(keys.lane_index(record.lane), {record.id: record.created_at})
                pipe.zadd(keys.UNSENT, {record.id: record.created_at})
            pipe.zadd(keys.CREATED, {f"{record.tenant}/{record.id}": record.created_at})
            if record.deadline_at is not None:
                pipe.zadd(keys.DEADLINES, {record.id: record.deadline_at})
            if record.cancel_at is not None and not record.status.ended:
                pipe.zadd(keys.CANCEL_AT, {record.id: record.cancel_at})
            # Counted in the same transaction as the record (domain/job_metrics.py).
            job_metrics.add_count(pipe, job_metrics.SUBMITTED, (record.model, record.lane))
            if record.status.ended:  # a result-cache hit: submitted and ended at once
                job_metrics.add_count(pipe, job_metrics.RESULT_CACHE, ("hit",))
                job_metrics.add_count(pipe, job_metrics.ENDED, (record.model, record.lane, str(record.status), ""))
                job_metrics.add_observation(pipe, job_metrics.TOTAL, (record.model, record.lane, str(record.status)),
                                            (record.finished_at or record.created_at) - record.created_at)
            pipe.execute()

    def sent(self, job_id: str) -> None:
        """The job's message is out (or it needs none: it follows an identical job)."""
        self.redis.zrem(keys.UNSENT, job_id)

    def unsent(self, older_than: float, limit: int = 100) -> list[str]:
        """Queued jobs marked unsent since before ``older_than``: their sender may have died."""
        return [i.decode() for i in self.redis.zrangebyscore(keys.UNSENT, "-inf", older_than, start=0, num=limit)]

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(self.key(job_id))
        return JobRecord.from_hash(raw) if raw else None

    def move(self, job_id: str, to: JobState, allowed_from: set[JobState], fence: str | None = None,
             **fields) -> tuple[bool, JobState | None]:
        """Set ``status`` to ``to`` (and ``fields``) if the job is in one of ``allowed_from``.

        ``fence``: the pool process whose run the move ends; the move happens only if that process
        started the job's latest run (the record's ``worker``). Returns ``(moved, state_before)``;
        ``state_before`` is None for a job that does not exist.
        """
        args = [self.channel(job_id), str(to), ",".join(sorted(allowed_from)), time.time(), fence or ""]
        for name, value in fields.items():
            args += [name, json.dumps(value) if name in JobRecord._JSON_FIELDS else str(value)]
        answer = self._transition(keys=[self.key(job_id)], args=args)
        if not answer:
            return False, None
        moved, before = bool(answer[0]), JobState(answer[1].decode())
        if moved and self.on_moved is not None:
            message_id = answer[2].decode() if len(answer) > 2 and answer[2] else None
            self.on_moved(job_id, before, to, message_id)
        return moved, before

    def start(self, job_id: str, model_version: str | None, model_used: dict | None = None,
              worker: str | None = None) -> int:
        """Queued (or running, when a dead worker's job is redelivered) → running, by pool process ``worker``.

        Returns the job's attempts counting this one, or 0 when it did not start.

        ``model_version`` is the version that runs; a job run by a fallback model passes None (the
        requested model did not run: its version stays the one recorded at submit) and ``model_used``.
        """
        versions = {} if model_version is None else {"model_version": model_version}
        runner = {} if worker is None else {"worker": worker}
        moved, _ = self.move(
            job_id, JobState.RUNNING, {JobState.QUEUED, JobState.RUNNING},
            started_at=time.time(), model_used=model_used, **versions, **runner,
        )
        return int(self.redis.hincrby(self.key(job_id), "attempts", 1)) if moved else 0

    def succeed(self, job_id: str, result_key: str, instances: int, fence: str | None = None,
                timings: dict[str, float] | None = None) -> bool:
        extra = {"timings": timings} if timings else {}
        moved, _ = self.move(
            job_id, JobState.SUCCEEDED, {JobState.RUNNING}, fence,
            finished_at=time.time(), result_key=result_key, instances=instances, **extra,
        )
        return moved

    def fail(self, job_id: str, code: str, message: str, fence: str | None = None) -> bool:
        moved, _ = self.move(
            job_id, JobState.FAILED, {JobState.QUEUED, JobState.RUNNING}, fence,
            finished_at=time.time(), error={"code": code, "message": message},
        )
        return moved

    def cancel(self, job_id: str) -> tuple[bool, JobState | None]:
        """Queued or running → canceled. A running job's worker discards its result when it ends."""
        return self.move(job_id, JobState.CANCELED, {JobState.QUEUED, JobState.RUNNING}, finished_at=time.time())

    def expire(self, job_id: str) -> bool:
        """Queued → expired: its deadline passed before it started; it will never run."""
        moved, _ = self.move(
            job_id, JobState.EXPIRED, {JobState.QUEUED}, finished_at=time.time(),
            error={"code": "deadline", "message": "the job's deadline passed before it started"},
        )
        return moved

    def cancel_overdue(self, job_id: str, now: float | None = None) -> bool:
        """Queued or running → canceled with code ``cancel_after``, if its Cancel-After has passed.

        A running job's worker finds it canceled when it ends and discards its result (no fence here:
        whichever run holds it, the job is over).
        """
        record = self.get(job_id)
        if record is None or record.cancel_at is None or record.status.ended or (now or time.time()) < record.cancel_at:
            return False
        was_running = record.status == JobState.RUNNING
        moved, _ = self.move(
            job_id, JobState.CANCELED, {JobState.QUEUED, JobState.RUNNING}, finished_at=time.time(),
            error={"code": cancel_after.CODE,
                   "message": cancel_after.message(record.cancel_at - record.created_at, was_running)},
        )
        return moved

    def cancel_due(self, now: float | None = None, limit: int = 100) -> list[str]:
        """Cancel every job whose Cancel-After has passed unended (queued or running); return their ids."""
        now = now or time.time()
        canceled = []
        for raw in self.redis.zrangebyscore(keys.CANCEL_AT, "-inf", now, start=0, num=limit):
            job_id = raw.decode()
            if self.cancel_overdue(job_id, now):
                canceled.append(job_id)
            self.redis.zrem(keys.CANCEL_AT, job_id)  # canceled now, or it ended in time (or is gone)
        return canceled

    def requeue(self, job_id: str, reason: dict, fence: str | None = None) -> bool:
        """Running → queued again (out of memory, a lost worker); ``reason`` is kept as ``last_error``."""
        moved, _ = self.move(job_id, JobState.QUEUED, {JobState.RUNNING}, fence, last_error=reason,
                             requeued_at=time.time())
        return moved

    def running(self) -> list[tuple[str, float]]:
        """``(job id, started at)`` of every running job, oldest first."""
        return [(job_id.decode(), score) for job_id, score in self.redis.zrange(keys.RUNNING, 0, -1, withscores=True)]

    def expire_due(self, now: float | None = None, limit: int = 100) -> list[str]:
        """Expire every queued job whose deadline has passed; return their ids."""
        due = self.redis.zrangebyscore(keys.DEADLINES, "-inf", now or time.time(), start=0, num=limit)
        expired = []
        for raw in due:
            job_id = raw.decode()
            if self.expire(job_id):
                expired.append(job_id)
            else:
                self.redis.zrem(keys.DEADLINES, job_id)  # it started or ended in time
        return expired

    def record_duration(self, seconds: float) -> None:
        """Remember how long a job ran, for queue-time estimates."""
        with self.redis.pipeline() as pipe:
            pipe.lpush(keys.DURATIONS, f"{seconds:.4f}")
            pipe.ltrim(keys.DURATIONS, 0, 99)
            pipe.execute()

    def mean_duration(self, default: float = 1.0) -> float:
        values = [float(v) for v in self.redis.lrange(keys.DURATIONS, 0, 49)]
        return sum(values) / len(values) if values else default

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
