"""Where job records are kept: one Redis hash per job, with a TTL, moved by one Lua script.

Celery's result state cannot tell "pending" from "unknown id", so the record
(``domain/records.py``) is the truth about a job. Every state change goes
through one Lua script that checks the state it leaves, so two processes
cannot both move a job (a cancel racing a start, a redelivered job that
already succeeded), and that publishes the change for long-polling readers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from domain import cancel_after, keys
from domain.records import JobRecord, JobState
from stores import job_metrics, outbox
from stores.job_metrics import JobMetrics

# ``JobStore.on_moved``: (job id, state before, state after, the webhook message the move wrote or None).
OnMoved = Callable[[str, JobState | None, JobState, str | None], None]

_TRANSITION = keys.lua(
    """
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
-- completes it, in this same step, so a crash cannot lose the completion (stores/batches.py).
local batch = redis.call('HGET', KEYS[1], 'batch')
if batch and (ARGV[2] == 'succeeded' or ARGV[2] == 'failed' or ARGV[2] == 'canceled' or ARGV[2] == 'expired')
    and redis.call('SREM', '${batch}' .. batch .. ':pending', id) == 1
    and redis.call('SCARD', '${batch}' .. batch .. ':pending') == 0
    and redis.call('HEXISTS', '${batch}' .. batch, 'sealed_at') == 1
    and redis.call('HSETNX', '${batch}' .. batch, 'completed_at', ARGV[4]) == 1 then
  redis.call('ZADD', '${batches_unnotified}', ARGV[4], batch)
end
-- The move's webhook event, if the job's webhook wants it: its message and outbox entry, in this same step,
-- so a process that dies right after the move cannot lose it (stores/outbox.py).
"""
    + outbox.QUEUE_JOB_EVENT_LUA
    + job_metrics.COUNT_MOVE_LUA
    + """
return {1, current, webhook_message}
"""
)


# KEYS[1]: the job's hash. ARGV: the run's process (fence), field/value pairs. Writes the fields only while
# that run holds the job (running, and started by it): a run taken over can no longer move its progress.
# Nothing is published: the job's channel announces state moves, which progress is not.
_PROGRESS = keys.lua(
    """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""
)


class JobStore:
    """Reads and moves job records in Redis.

    ``on_moved(job_id, state_before, state_after, message_id)``, if given, is called after every move that
    happened; ``message_id`` is the webhook message the move wrote to the outbox, or None (the fast path
    that queues it hangs on this: ``stores.webhooks.JobEvents``).
    """

    def __init__(self, client: redis.Redis, ttl_s: int, on_moved: OnMoved | None = None) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.on_moved = on_moved
        self.metrics = JobMetrics(client)
        self._transition = client.register_script(_TRANSITION)
        self._progress = client.register_script(_PROGRESS)

    key = staticmethod(keys.job)
    channel = staticmethod(keys.job_events)

    def create(self, record: JobRecord, ttl_s: int | None = None) -> None:
        """Write a new record (kept ``ttl_s``, else the store's TTL); a queued one is indexed in its lane.

        A record created already ended (a result-cache hit) is in no lane. A queued one is marked
        unsent in the same transaction: see :meth:`sent`.
        """
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key(record.id), mapping=record.to_hash())  # type: ignore[arg-type]  # (redis-py: str keys)
            pipe.expire(self.key(record.id), ttl_s or self.ttl_s)
            if record.status == JobState.QUEUED:
                pipe.zadd(keys.lane_index(record.lane), {record.id: record.created_at})
                pipe.zadd(keys.UNSENT, {record.id: record.created_at})
            pipe.zadd(keys.CREATED, {f"{record.tenant}/{record.id}": record.created_at})
            if record.deadline_at is not None:
                pipe.zadd(keys.DEADLINES, {record.id: record.deadline_at})
            if record.cancel_at is not None and not record.status.ended:
                pipe.zadd(keys.CANCEL_AT, {record.id: record.cancel_at})
            # Counted in the same transaction as the record (stores/job_metrics.py).
            job_metrics.add_count(pipe, job_metrics.SUBMITTED, (record.model, record.lane))
            if record.status.ended:  # a result-cache hit: submitted and ended at once
                job_metrics.add_count(pipe, job_metrics.RESULT_CACHE, ("hit",))
                job_metrics.add_count(pipe, job_metrics.ENDED, (record.model, record.lane, str(record.status), ""))
                job_metrics.add_observation(
                    pipe,
                    job_metrics.TOTAL,
                    (record.model, record.lane, str(record.status)),
                    (record.finished_at or record.created_at) - record.created_at,
                )
            pipe.execute()

    def sent(self, job_id: str) -> None:
        """The job's message is out (or it needs none: it follows an identical job)."""
        self.redis.zrem(keys.UNSENT, job_id)

    def unsent(self, older_than: float, limit: int = 100) -> list[str]:
        """Queued jobs marked unsent since before ``older_than``: their sender may have died."""
        unsent = cast("list[bytes]", self.redis.zrangebyscore(keys.UNSENT, "-inf", older_than, start=0, num=limit))
        return [i.decode() for i in unsent]

    def get(self, job_id: str) -> JobRecord | None:
        raw = cast("dict[bytes, bytes]", self.redis.hgetall(self.key(job_id)))  # (clients here answer bytes)
        return JobRecord.from_hash(raw) if raw else None

    def status(self, job_id: str) -> JobState | None:
        """The job's state alone (one field: cheap enough to ask before every frame of a video)."""
        raw = cast("bytes | None", self.redis.hget(self.key(job_id), "status"))
        return JobState(raw.decode()) if raw else None

    def held_by(self, job_id: str, run: str) -> bool:
        """Whether run ``run`` (a pool process) still holds the job: it is running, and that run started it."""
        status, worker = cast("list[bytes | None]", self.redis.hmget(self.key(job_id), ["status", "worker"]))
        return status == JobState.RUNNING.value.encode() and worker == run.encode()

    def note_progress(self, job_id: str, fence: str, **fields: object) -> bool:
        """Write a running job's progress ``fields`` (not a state move), if run ``fence`` still holds it."""
        args: list[str] = [fence]
        for name, value in fields.items():
            args += [name, json.dumps(value) if name in JobRecord.JSON_FIELDS else str(value)]
        return bool(self._progress(keys=[self.key(job_id)], args=args))

    def move(
        self, job_id: str, to: JobState, allowed_from: set[JobState], fence: str | None = None, **fields: object
    ) -> tuple[bool, JobState | None]:
        """Set ``status`` to ``to`` (and ``fields``) if the job is in one of ``allowed_from``.

        ``fence``: the pool process whose run the move ends; the move happens only if that process
        started the job's latest run (the record's ``worker``). Returns ``(moved, state_before)``;
        ``state_before`` is None for a job that does not exist.
        """
        args: list[str | float] = [
            self.channel(job_id),
            str(to),
            ",".join(sorted(allowed_from)),
            time.time(),
            fence or "",
        ]
        for name, value in fields.items():
            args += [name, json.dumps(value) if name in JobRecord.JSON_FIELDS else str(value)]
        answer = self._transition(keys=[self.key(job_id)], args=args)
        if not answer:
            return False, None
        moved, before = bool(answer[0]), JobState(answer[1].decode())
        if moved and self.on_moved is not None:
            message_id = answer[2].decode() if len(answer) > 2 and answer[2] else None
            self.on_moved(job_id, before, to, message_id)
        return moved, before

    def start(
        self,
        job_id: str,
        model_version: str | None,
        model_used: dict[str, Any] | None = None,
        worker: str | None = None,
    ) -> int:
        """Queued (or running, when a dead worker's job is redelivered) → running, by pool process ``worker``.

        Returns the job's attempts counting this one, or 0 when it did not start.

        ``model_version`` is the version that runs; a job run by a fallback model passes None (the
        requested model did not run: its version stays the one recorded at submit) and ``model_used``.
        """
        versions = {} if model_version is None else {"model_version": model_version}
        runner = {} if worker is None else {"worker": worker}
        moved, _ = self.move(
            job_id,
            JobState.RUNNING,
            {JobState.QUEUED, JobState.RUNNING},
            started_at=time.time(),
            model_used=model_used,
            **versions,
            **runner,
        )
        return int(self.redis.hincrby(self.key(job_id), "attempts", 1)) if moved else 0

    def succeed(
        self,
        job_id: str,
        result_key: str,
        instances: int,
        fence: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> bool:
        extra = {"timings": timings} if timings else {}
        moved, _ = self.move(
            job_id,
            JobState.SUCCEEDED,
            {JobState.RUNNING},
            fence,
            finished_at=time.time(),
            result_key=result_key,
            instances=instances,
            **extra,
        )
        return moved

    def fail(self, job_id: str, code: str, message: str, fence: str | None = None) -> bool:
        """Queued or running → failed; with ``fence``, running only: a run whose job was put back on its lane
        (recovery keeps the record's ``worker`` until the next start) no longer holds it."""
        moved, _ = self.move(
            job_id,
            JobState.FAILED,
            {JobState.RUNNING} if fence else {JobState.QUEUED, JobState.RUNNING},
            fence,
            finished_at=time.time(),
            error={"code": code, "message": message},
        )
        return moved

    def cancel(self, job_id: str) -> tuple[bool, JobState | None]:
        """Queued or running → canceled. A running job's worker discards its result when it ends."""
        return self.move(job_id, JobState.CANCELED, {JobState.QUEUED, JobState.RUNNING}, finished_at=time.time())

    def expire(self, job_id: str) -> bool:
        """Queued → expired: its deadline passed before it started; it will never run."""
        moved, _ = self.move(
            job_id,
            JobState.EXPIRED,
            {JobState.QUEUED},
            finished_at=time.time(),
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
            job_id,
            JobState.CANCELED,
            {JobState.QUEUED, JobState.RUNNING},
            finished_at=time.time(),
            error={
                "code": cancel_after.CODE,
                "message": cancel_after.message(record.cancel_at - record.created_at, was_running),
            },
        )
        return moved

    def cancel_due(self, now: float | None = None, limit: int = 100) -> list[str]:
        """Cancel every job whose Cancel-After has passed unended (queued or running); return their ids."""
        now = now or time.time()
        canceled = []
        for raw in cast("list[bytes]", self.redis.zrangebyscore(keys.CANCEL_AT, "-inf", now, start=0, num=limit)):
            job_id = raw.decode()
            if self.cancel_overdue(job_id, now):
                canceled.append(job_id)
            self.redis.zrem(keys.CANCEL_AT, job_id)  # canceled now, or it ended in time (or is gone)
        return canceled

    def requeue(self, job_id: str, reason: dict[str, Any], fence: str | None = None) -> bool:
        """Running → queued again (out of memory, a lost worker); ``reason`` is kept as ``last_error``."""
        moved, _ = self.move(
            job_id, JobState.QUEUED, {JobState.RUNNING}, fence, last_error=reason, requeued_at=time.time()
        )
        return moved

    def running(self) -> list[tuple[str, float]]:
        """``(job id, started at)`` of every running job, oldest first."""
        running = cast("list[tuple[bytes, float]]", self.redis.zrange(keys.RUNNING, 0, -1, withscores=True))
        return [(job_id.decode(), score) for job_id, score in running]

    def expire_due(self, now: float | None = None, limit: int = 100) -> list[str]:
        """Expire every queued job whose deadline has passed; return their ids."""
        due = cast(
            "list[bytes]", self.redis.zrangebyscore(keys.DEADLINES, "-inf", now or time.time(), start=0, num=limit)
        )
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
