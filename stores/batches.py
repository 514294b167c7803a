"""Where batches are kept: a hash in Redis beside two collections, written by the web, completed by job moves.

The batch itself, its progress and its document are ``domain/batches.py``;
how a batch lives (receiving, sealed, completed, its ``batch.completed``
event taken under a lease) is told there. The collections (domain/keys.py):

- ``…:jobs``: its jobs in upload order, ``[job id, file name]`` each;
- ``…:pending``: the ids of its jobs that have not ended.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, cast

import redis

from domain import keys
from domain.batches import BatchRecord
from domain.records import JobState
from stores.jobs import JobStore

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


class BatchStore:
    """Reads and writes batches in Redis; their jobs are records of the :class:`JobStore` like any other."""

    def __init__(self, client: redis.Redis, jobs: JobStore) -> None:
        self.redis = client
        self.jobs = jobs
        self._seal = client.register_script(_SEAL)
        self._take_due = client.register_script(_TAKE_DUE)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def create(self, batch: BatchRecord) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.batch(batch.id), mapping=batch.to_hash())  # type: ignore[arg-type]  # (redis-py: str keys)
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
        raw = cast("dict[bytes, bytes]", self.redis.hgetall(keys.batch(batch_id)))  # (clients here answer bytes)
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

    def reject(self, batch_id: str, rejected: list[dict[str, Any]]) -> None:
        self.redis.hset(keys.batch(batch_id), "rejected", json.dumps(rejected))

    def seal(self, batch_id: str) -> bool:
        """Every image is a job now; True when that completes the batch (none was pending)."""
        return bool(self._seal(keys=[keys.batch(batch_id)], args=[time.time(), batch_id]) == 2)

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
        stale = cast(
            "list[bytes]", self.redis.zrangebyscore(keys.BATCHES_RECEIVING, "-inf", now - timeout_s, start=0, num=most)
        )
        sealed = []
        for raw in stale:
            batch_id = raw.decode()
            if self._seal(keys=[keys.batch(batch_id)], args=[now, batch_id, now - timeout_s]):
                sealed.append(batch_id)
        return sealed

    def job_entries(self, batch_id: str) -> list[tuple[str, str]]:
        """``(job id, file name)`` of every job of the batch, in upload order."""
        return [(job_id, name) for job_id, name in map(json.loads, self.redis.lrange(keys.batch_jobs(batch_id), 0, -1))]

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
