"""Batches: many images posted at once (``POST /v1/batches``), one job each, followed as one thing.

A batch is a hash in Redis beside two collections (domain/keys.py):

- ``…:jobs``: its jobs in upload order, ``[job id, file name]`` each;
- ``…:pending``: the ids of its jobs that have not ended.

The web process writes the batch first (``receiving``), adds each job to
``pending`` *before* the job exists (so the job cannot end unseen), and
seals the batch when every image is a job; while it fans out it touches the
batch with each image (``touched_at``, and its score in the index of batches
still receiving). The job's own state move takes
it out of ``pending`` (the transition script in domain/records.py); the move
that empties the pending set of a sealed batch completes the batch in the
same step and marks its ``batch.completed`` event due. Whoever notices a due
event (the web after sealing, every worker's upkeep) takes it under a lease
and queues its webhook; a process that dies in between leaves the lease to
run out, and the next one queues it. A batch that goes quiet while receiving
(its uploader died mid fan-out) is sealed with the jobs it has once
``batch_receive_timeout_s`` has passed since its last touch, by every worker's
upkeep (so a webhook-only client still gets ``batch.completed``) or by a read.
Everything is in Redis, so a batch outlives any web or worker restart.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import redis

from domain import keys
from domain.records import ENDED, JobState, JobStore, rfc3339

STATES = tuple(str(s) for s in JobState)
NOTIFY_LEASE_S = 60

_SEAL = keys.lua("""
-- KEYS[1]: the batch. ARGV: now, its id[, cutoff]. Seal it (given a cutoff: only if it was last touched no
-- later, so a fan-out still at work is never sealed under it); complete it at once when no job is pending.
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'sealed_at') == 1 then
  redis.call('ZREM', '${batches_receiving}', ARGV[2])
  return 0
end
if ARGV[3] then
  local last = redis.call('HGET', KEYS[1], 'touched_at') or redis.call('HGET', KEYS[1], 'created_at')
  if tonumber(last) > tonumber(ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[1], 'sealed_at', ARGV[1])
redis.call('ZREM', '${batches_receiving}', ARGV[2])
-- A job counted pending whose record was never written (its uploader died in between) never ends.
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1] .. ':pending')) do
  if redis.call('EXISTS', '${job}' .. id) == 0 then redis.call('SREM', KEYS[1] .. ':pending', id) end
end
if redis.call('SCARD', KEYS[1] .. ':pending') == 0 and redis.call('HSETNX', KEYS[1], 'completed_at', ARGV[1]) == 1 then
  redis.call('ZADD', '${batches_unnotified}', ARGV[1], ARGV[2])
  return 2
end
return 1
""")

_TAKE_DUE = keys.lua("""
-- ARGV: now, lease seconds, most. The due batch events, each pushed a lease ahead so no one else takes it.
local due = redis.call('ZRANGEBYSCORE', '${batches_unnotified}', '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do
  redis.call('ZADD', '${batches_unnotified}', ARGV[1] + ARGV[2], id)
end
return due
""")


@dataclass
class BatchRecord:
    """What the service keeps about one batch (its jobs are kept beside it)."""

    id: str
    tenant: str
    created_at: float
    total: int = 0
    lane: str = "batch"
    model: str | None = None
    webhook: dict | None = None
    rejected: list[dict] = field(default_factory=list)
    touched_at: float | None = None  # its fan-out's last sign of life (None: none since created_at)
    sealed_at: float | None = None
    completed_at: float | None = None
    canceled_at: float | None = None

    _JSON = ("webhook", "rejected")
    _FLOATS = ("created_at", "touched_at", "sealed_at", "completed_at", "canceled_at")

    def to_hash(self) -> dict[str, str]:
        return {k: json.dumps(v) if k in self._JSON else str(v) for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> "BatchRecord":
        data = {k.decode(): v.decode() for k, v in raw.items()}
        kwargs: dict = {}
        for name in cls.__dataclass_fields__:
            if name not in data:
                continue
            value = data[name]
            kwargs[name] = (json.loads(value) if name in cls._JSON else float(value) if name in cls._FLOATS
                            else int(value) if name == "total" else value)
        return cls(**kwargs)

    @property
    def status(self) -> str:
        if self.sealed_at is None:
            return "receiving"
        if self.completed_at is None:
            return "canceling" if self.canceled_at else "running"
        return "canceled" if self.canceled_at else "completed"


class BatchStore:
    """Reads and writes batches in Redis; their jobs are records of the :class:`JobStore` like any other."""

    def __init__(self, client: redis.Redis, jobs: JobStore):
        self.redis = client
        self.jobs = jobs
        self._seal = client.register_script(_SEAL)
        self._take_due = client.register_script(_TAKE_DUE)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def create(self, batch: BatchRecord) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.batch(batch.id), mapping=batch.to_hash())
            pipe.expire(keys.batch(batch.id), self.jobs.ttl_s)
            pipe.zadd(keys.BATCHES_RECEIVING, {batch.id: batch.created_at})
            pipe.execute()

    def touch(self, batch_id: str) -> None:
        """The fan-out is still at work on the batch: it is not abandoned (see :meth:`seal_abandoned`)."""
        now = time.time()
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.batch(batch_id), "touched_at", now)
            pipe.zadd(keys.BATCHES_RECEIVING, {batch_id: now}, xx=True)  # a sealed batch is not put back
            pipe.execute()

    def get(self, batch_id: str) -> BatchRecord | None:
        raw = self.redis.hgetall(keys.batch(batch_id))
        return BatchRecord.from_hash(raw) if raw else None

    def will_add(self, batch_id: str, job_id: str) -> None:
        """Before job ``job_id`` exists: count it pending, so its end is seen however soon it comes."""
        with self.redis.pipeline() as pipe:
            pipe.sadd(keys.batch_pending(batch_id), job_id)
            pipe.expire(keys.batch_pending(batch_id), self.jobs.ttl_s)
            pipe.execute()

    def added(self, batch_id: str, job_id: str, file_name: str, ended: bool) -> None:
        """Job ``job_id`` exists (``ended``: it was created ended, a result-cache hit, so it is not pending)."""
        with self.redis.pipeline() as pipe:
            pipe.rpush(keys.batch_jobs(batch_id), json.dumps([job_id, file_name]))
            pipe.expire(keys.batch_jobs(batch_id), self.jobs.ttl_s)
            pipe.hincrby(keys.batch(batch_id), "total", 1)
            if ended:
                pipe.srem(keys.batch_pending(batch_id), job_id)
            pipe.execute()

    def not_added(self, batch_id: str, job_id: str) -> None:
        """The image was refused after :meth:`will_add`: the job will never exist."""
        self.redis.srem(keys.batch_pending(batch_id), job_id)

    def discard(self, batch_id: str) -> None:
        """Forget a batch none of whose images became a job."""
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.batch(batch_id), keys.batch_jobs(batch_id), keys.batch_pending(batch_id))
            pipe.zrem(keys.BATCHES_RECEIVING, batch_id)
            pipe.execute()

    def reject(self, batch_id: str, rejected: list[dict]) -> None:
        self.redis.hset(keys.batch(batch_id), "rejected", json.dumps(rejected))

    def seal(self, batch_id: str) -> bool:
        """Every image is a job now; True when that completes the batch (none was pending)."""
        return self._seal(keys=[keys.batch(batch_id)], args=[time.time(), batch_id]) == 2

    def seal_if_abandoned(self, batch: BatchRecord, timeout_s: float) -> BatchRecord:
        """A batch still receiving, untouched for ``timeout_s``, lost its uploader: seal it with the jobs it has."""
        now = time.time()
        if batch.sealed_at is None and now - (batch.touched_at or batch.created_at) > timeout_s:
            self._seal(keys=[keys.batch(batch.id)], args=[now, batch.id, now - timeout_s])
            return self.get(batch.id) or batch
        return batch

    def seal_abandoned(self, timeout_s: float, most: int = 100) -> list[str]:
        """Seal every batch still receiving and untouched for ``timeout_s``; the ids of those sealed.

        Run by every worker's upkeep, so that a batch whose uploader died completes (and sends its
        ``batch.completed``) though no one reads it.
        """
        now = time.time()
        stale = self.redis.zrangebyscore(keys.BATCHES_RECEIVING, "-inf", now - timeout_s, start=0, num=most)
        sealed = []
        for raw in stale:
            batch_id = raw.decode()
            if self._seal(keys=[keys.batch(batch_id)], args=[now, batch_id, now - timeout_s]):
                sealed.append(batch_id)
        return sealed

    def job_entries(self, batch_id: str) -> list[tuple[str, str]]:
        """``(job id, file name)`` of every job of the batch, in upload order."""
        return [tuple(json.loads(raw)) for raw in self.redis.lrange(keys.batch_jobs(batch_id), 0, -1)]

    def statuses(self, job_ids: list[str]) -> list[str]:
        """Each job's status (``expired`` for a record retention already removed)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(keys.job(job_id), "status")
            answers = pipe.execute()
        return [a.decode() if a else str(JobState.EXPIRED) for a in answers]

    def mark_canceled(self, batch_id: str) -> None:
        self.redis.hsetnx(keys.batch(batch_id), "canceled_at", time.time())

    def take_due_events(self, most: int = 50) -> list[str]:
        """Completed batches whose event is due, each taken for :data:`NOTIFY_LEASE_S`."""
        return [b.decode() for b in self._take_due(args=[time.time(), NOTIFY_LEASE_S, most])]

    def event_queued(self, batch_id: str) -> None:
        self.redis.zrem(keys.BATCHES_UNNOTIFIED, batch_id)


def progress(batch: BatchRecord, statuses: list[str], now: float | None = None) -> dict:
    """Counts by status, the fraction done and an estimate of when the rest ends (from the rate so far)."""
    now = now or time.time()
    counts = {state: 0 for state in STATES}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    done = sum(counts[str(s)] for s in ENDED)
    total = len(statuses)
    eta_s = None
    if batch.completed_at is None and done and total > done:
        rate = done / max(now - batch.created_at, 1e-3)  # jobs ended per second since the batch began
        eta_s = round((total - done) / rate, 1)
    return {"counts": counts, "done": done, "progress": round(done / total, 4) if total else 1.0,
            "eta_s": eta_s, "estimated_completion_at": rfc3339(now + eta_s) if eta_s is not None else None}


def document(batch: BatchRecord, entries: list[tuple[str, str]], statuses: list[str], base_url: str) -> dict:
    """The batch as ``GET /v1/batches/{id}`` shows it (and as its ``batch.completed`` webhook carries it)."""
    doc = {
        "id": batch.id,
        "status": batch.status,
        "lane": batch.lane,
        "model": batch.model,
        "total": len(entries),
        **progress(batch, statuses),
        "rejected": batch.rejected,
        "created_at": rfc3339(batch.created_at),
        "completed_at": rfc3339(batch.completed_at),
        "canceled_at": rfc3339(batch.canceled_at),
        "coco_url": f"{base_url.rstrip('/')}/v1/batches/{batch.id}/coco",
        "jobs": [{"id": job_id, "file_name": name, "status": status}
                 for (job_id, name), status in zip(entries, statuses)],
    }
    return doc
