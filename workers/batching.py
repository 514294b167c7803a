"""Dynamic batching: a worker running one job takes more queued jobs of the same model along.

Only for a model that gains from it: it stacks a batch into one inference
call (its capabilities' ``stacks_batches``: the adapter class declares it, a
pipeline has it when all its steps do) *and* its
manifest sets ``max_batch_size`` above 1 (and ``MASKQ_BATCHING`` is on).
Neither bundled adapter stacks a batch, so by default every job runs alone
through ``workers/pipeline.py`` and pays nothing for this module.

When ``job_runner`` runs job A of such a model, :func:`run` looks for more
queued jobs of that model, waiting at most ``batch_wait_ms`` for them, and
runs them all through the adapter at once.

- **Lane order.** Jobs are taken only from A's own lane, and only while every
  higher lane's broker list is empty: the jobs taken are exactly the ones
  this worker would have run next. Jobs of other models are skipped and stay
  where they are, in order.
- **No loss.** A Lua script moves each message off the lane list into a hash
  owned by this pool process (``maskq:claimed:{host}:{pid}``), so a message
  is always in exactly one place. A job's claim is deleted (its
  acknowledgement) only after its result is stored and its record ended. If
  the process dies, every worker's lane upkeep (:class:`ClaimRecovery`) sees
  the owner's heartbeat gone and puts the messages back on their lanes; a
  redelivered job that already ended is skipped by ``run_job`` as ever. A's
  own Celery message is acknowledged by Celery when ``run_job`` returns.
- **Isolation.** Each job's input is loaded, and its result stored, on its
  own; if the batched inference fails as a whole, each job is run alone, so a
  bad input fails only its own job.
- **Limits.** The batch runs inside A's task, so A's time limits bound the
  whole batch (set a batching model's limits, and its ``memory_mb`` for the
  resource gate, for a full batch). Past the soft limit A fails with
  ``timeout`` and the jobs taken along go back to their lane.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, cast

import redis
from celery.exceptions import SoftTimeLimitExceeded

from config.settings import LANES
from config.task_names import RUN_JOB
from domain import keys
from domain.errors import MaskqError
from domain.records import JobRecord, JobState
from models.adapters.base import Instance
from storage import Storage
from stores import fleet
from stores.jobs import JobStore
from workers import job_end, metrics, pipeline

log = logging.getLogger(__name__)

OWNERS = keys.CLAIM_OWNERS  # the owners (host:pid) that hold claims now
SCAN_DEPTH = 100  # messages looked at from the consuming end of the lane, per claim
POLL_S = 0.001
WORKER_LOST = {"code": "worker_lost", "message": "the worker running it in a batch stopped; put back on its lane"}
INTERRUPTED = {"code": "batch_interrupted", "message": "the batch it ran in did not finish; put back on its lane"}

# KEYS[1]: the lane's broker list, KEYS[2]: the owner's claims hash, KEYS[3]: OWNERS,
# KEYS[4..]: the broker lists of every higher lane.
# ARGV: owner, model, how many, now, scan depth, job id to skip, lane name, the run-job task's name.
# Returns {higher lane busy (0/1), claimed ids...}. Producers LPUSH and consumers BRPOP, so the
# oldest message is at the right end.
_CLAIM = keys.lua("""
for i = 4, #KEYS do
  if redis.call('LLEN', KEYS[i]) > 0 then return {1} end
end
local claimed = {0}
local window = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[5]), -1)
for i = #window, 1, -1 do
  if #claimed > tonumber(ARGV[3]) then break end
  local message = window[i]
  local ok, envelope = pcall(cjson.decode, message)
  local headers = ok and type(envelope) == 'table' and envelope['headers']
  local id = type(headers) == 'table' and headers['task'] == ARGV[8] and headers['id']
  if type(id) == 'string' and id ~= ARGV[6] and redis.call('HEXISTS', KEYS[2], id) == 0 then
    local job = redis.call('HMGET', '${job}' .. id, 'status', 'model', 'deadline_at')
    if job[1] == 'queued' and job[2] == ARGV[2] and (not job[3] or tonumber(job[3]) > tonumber(ARGV[4])) then
      redis.call('LREM', KEYS[1], -1, message)
      redis.call('HSET', KEYS[2], id, cjson.encode({lane = ARGV[7], at = ARGV[4], message = message}))
      redis.call('SADD', KEYS[3], ARGV[1])
      table.insert(claimed, id)
    end
  end
end
return claimed
""")

# KEYS[1]: the owner's claims hash, KEYS[2]: OWNERS, KEYS[3]: the claim's lane list.
# ARGV: owner, job id, 1 to put the message back on the lane (at the back, as Celery does) or 0 to drop it.
_SETTLE = """
local entry = redis.call('HGET', KEYS[1], ARGV[2])
if not entry then return 0 end
if ARGV[3] == '1' then redis.call('LPUSH', KEYS[3], cjson.decode(entry)['message']) end
redis.call('HDEL', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[1]) end
return 1
"""


claims_key = keys.claims


def wanted(choice, settings) -> bool:
    """Whether a job running on ``choice`` should look for company: only a model that gains from it does.

    A stand-in model (degraded) may not take every prompt its jobs have, so it runs them one by one.
    """
    adapter = choice.adapter
    return (
        settings.batching
        and not choice.degraded
        and adapter.capabilities.stacks_batches
        and adapter.spec.max_batch_size > 1
    )


class Claims:
    """The messages one pool process took off the lanes for a batch, kept in Redis until each job is done."""

    def __init__(self, client: redis.Redis, owner: str):
        self.redis = client
        self.owner = owner
        self.key = claims_key(owner)
        self._claim = client.register_script(_CLAIM)
        self._settle = client.register_script(_SETTLE)

    def take(self, lane: str, model: str, wanted: int, skip: str) -> tuple[list[str], bool]:
        """Claim up to ``wanted`` queued jobs of ``model`` from ``lane``; ``(ids, a higher lane has work)``."""
        higher = list(LANES[: LANES.index(lane)])
        answer = self._claim(
            keys=[lane, self.key, OWNERS, *higher],
            args=[self.owner, model, wanted, time.time(), SCAN_DEPTH, skip, lane, RUN_JOB],
        )
        return [i.decode() for i in answer[1:]], bool(answer[0])

    def ack(self, job_id: str, lane: str) -> bool:
        """Drop the job's claim: it has ended (or will never run)."""
        return bool(self._settle(keys=[self.key, OWNERS, lane], args=[self.owner, job_id, 0]))

    def put_back(self, job_id: str, lane: str, jobs: JobStore, reason: dict) -> bool:
        """Return the job to its lane: its record to queued first, so no worker can start it in between."""
        record = jobs.get(job_id)
        if record is not None and record.status == JobState.RUNNING:
            jobs.requeue(job_id, reason)
            record = jobs.get(job_id)
        push = record is not None and not record.status.ended  # an ended job needs no second run
        return bool(self._settle(keys=[self.key, OWNERS, lane], args=[self.owner, job_id, int(push)]))

    def put_back_all(self, jobs: JobStore, reason: dict) -> list[str]:
        """Put back every job this owner still holds; returns their ids."""
        held = cast("dict[bytes, bytes]", self.redis.hgetall(self.key))  # the client returns bytes
        return [
            job_id.decode()
            for job_id, entry in held.items()
            if self.put_back(job_id.decode(), json.loads(entry)["lane"], jobs, reason)
        ]


class ClaimRecovery:
    """Puts the claims of pool processes that died back on their lanes; every worker's upkeep runs it.

    A claim is recovered once its owner's heartbeat has lapsed and it is older
    than ``grace_s`` (the heartbeat's own lifetime, so a claim is never taken
    from a process that merely started a moment ago). One worker at a time
    recovers an owner: two at once could put a job back, see another worker
    start it, and then move its record back to queued under that worker.
    """

    def __init__(self, client: redis.Redis, jobs: JobStore, grace_s: float, lock_s: float = 30):
        self.redis = client
        self.jobs = jobs
        self.grace_s = grace_s
        self.lock_s = lock_s

    def recover(self, now: float | None = None) -> list[str]:
        now = now or time.time()
        recovered = []
        for raw in cast("set[bytes]", self.redis.smembers(OWNERS)):
            owner = raw.decode()
            lock, token = f"{claims_key(owner)}:recovering", uuid.uuid4().hex
            if fleet.is_alive(self.redis, owner) or not self.redis.set(
                lock, token, nx=True, px=int(self.lock_s * 1000)
            ):
                continue
            try:
                claims = Claims(self.redis, owner)
                for job_id, entry in cast("dict[bytes, bytes]", self.redis.hgetall(claims.key)).items():
                    entry = json.loads(entry)
                    if now - float(entry["at"]) >= self.grace_s and claims.put_back(
                        job_id.decode(), entry["lane"], self.jobs, WORKER_LOST
                    ):
                        recovered.append(job_id.decode())
            finally:
                if self.redis.get(lock) == token.encode():
                    self.redis.delete(lock)
        return recovered


def gather(claims: Claims, jobs: JobStore, first: JobRecord, choice, wanted: int, wait_s: float) -> list[JobRecord]:
    """Claim and start up to ``wanted`` more jobs like ``first``, waiting at most ``wait_s`` for them.

    They start as ``first`` did: on ``choice`` (a ``workers.loaded_models.ModelChoice``), the model's
    own adapter or the fallback standing in for it.
    """
    deadline = time.monotonic() + wait_s
    started: list[JobRecord] = []
    while True:
        ids, higher_busy = claims.take(first.lane, first.model, wanted - len(started), skip=first.id)
        for job_id in ids:
            started_now = jobs.start(job_id, choice.model_version, model_used=choice.model_used, worker=claims.owner)
            record = jobs.get(job_id) if started_now else None
            if record is not None:
                started.append(record)
            else:
                claims.ack(job_id, first.lane)  # canceled or ended between the claim and the start
        # A job arriving in a higher lane goes next: stop waiting for company.
        if higher_busy or len(started) >= wanted or time.monotonic() >= deadline:
            return started
        time.sleep(POLL_S)


@dataclass
class Member:
    """One job of a batch and how far it got: ``outcome`` is ``(result_key, count)`` or the error."""

    record: JobRecord
    request: Any = None
    segment: Any = None
    instances: list[Instance] | None = None
    outcome: pipeline.Success | BaseException | None = None


def run(worker, record: JobRecord, choice, storage: Storage) -> pipeline.Success:
    """What ``job_runner`` calls in place of ``pipeline.run`` when :func:`wanted`: ``(result_key, count)`` of
    ``record``.

    ``choice`` is the ``ModelChoice`` the job started on. Raises what
    ``pipeline.run`` would raise for ``record`` itself; the other jobs of its
    batch are ended (or put back) here.
    """
    settings = worker.settings
    claims = Claims(worker.redis, fleet.this_process())
    # One pool process runs one batch at a time, so any claim it holds now is left over from a
    # batch that could not settle it (Redis was away): put it back rather than keep it forever.
    left = claims.put_back_all(worker.jobs, INTERRUPTED)
    if left:
        log.info("batching: %d job(s) left over from an earlier batch back on their lanes: %s", len(left), left)
    others = gather(
        claims, worker.jobs, record, choice, choice.adapter.spec.max_batch_size - 1, settings.batch_wait_ms / 1000
    )
    if others:
        return Batch(worker, choice.adapter, storage, claims, [record, *others]).run()
    holds = functools.partial(worker.holds, record.id)
    return pipeline.run(record, choice.adapter, storage, settings.max_image_bytes, settings.max_image_pixels, holds)


class Batch:
    """Jobs of one model run through the adapter together; the first is ``run_job``'s own."""

    def __init__(self, worker, adapter, storage: Storage, claims: Claims, records: list[JobRecord]):
        self.worker = worker
        self.settings = worker.settings
        self.jobs: JobStore = worker.jobs
        self.adapter = adapter
        self.storage = storage
        self.claims = claims
        self.lane = records[0].lane
        self.members = [Member(r) for r in records]
        self.pending = {r.id for r in records[1:]}  # claims not yet settled
        self.id = uuid.uuid4().hex

    def run(self) -> pipeline.Success:
        started = time.monotonic()
        try:
            for member in self.members:
                # Which batch a job ran in, for operators (and the tests): not part of the record's schema.
                self.jobs.redis.hset(
                    JobStore.key(member.record.id), mapping={"batch_id": self.id, "batch_size": len(self.members)}
                )
            log.info(
                "batch %s: %d jobs of %s: %s",
                self.id,
                len(self.members),
                self.adapter.name,
                [m.record.id for m in self.members],
            )
            for member in self.members:
                self._load(member)
            self._infer([m for m in self.members if m.outcome is None])
            share = (time.monotonic() - started) / len(self.members)
            for member in self.members:
                self._store(member)
                if member is not self.members[0]:
                    self._finish(member, share)
        finally:
            # Out of time, or anything unforeseen: what is not done goes back to its lane.
            for member in self.members[1:]:
                if member.record.id in self.pending:
                    try:
                        self.claims.put_back(member.record.id, self.lane, self.jobs, INTERRUPTED)
                    except redis.RedisError as exc:  # the claim stays; this process's next job puts it back
                        log.info("job %s: could not put it back yet (%s)", member.record.id, exc)
        outcome = self.members[0].outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None  # every member has ended
        return outcome

    def _load(self, member: Member) -> None:
        try:
            member.segment, member.request = pipeline.load_request(
                member.record, self.storage, self.settings.max_image_bytes, self.settings.max_image_pixels
            )
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            member.outcome = exc

    def _infer(self, ready: list[Member]) -> None:
        if not ready:
            return
        try:
            metrics.series().batch_size.labels(self.adapter.name).observe(len(ready))
            started = time.perf_counter()
            results = self.adapter.segment([m.segment for m in ready])
            metrics.series().inference.labels(self.adapter.name).observe(time.perf_counter() - started)
            if len(results) != len(ready):
                raise MaskqError(f"the adapter returned {len(results)} results for {len(ready)} requests")
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            log.info(
                "batch %s: failed as a whole (%s: %s); running its jobs one by one", self.id, type(exc).__name__, exc
            )
            for member in ready:
                try:
                    member.instances = self.adapter.segment([member.segment])[0]
                except SoftTimeLimitExceeded:
                    raise
                except Exception as one:
                    member.outcome = one
            return
        for member, instances in zip(ready, results):
            member.instances = instances

    def _store(self, member: Member) -> None:
        if member.outcome is not None:
            return
        try:
            assert member.instances is not None  # the model gave them (else the outcome is its error)
            key = pipeline.store_result(
                member.record,
                member.request,
                member.segment.image,
                member.instances,
                self.storage,
                member.segment.report,
                functools.partial(self.worker.holds, member.record.id),
            )
            member.outcome = (key, len(member.instances))
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            member.outcome = exc

    def _finish(self, member: Member, share_s: float) -> None:
        """End one claimed job as any job ends (``workers/job_end.py``), then acknowledge its claim."""
        job_id = member.record.id
        assert member.outcome is not None  # stored or failed by now
        job_end.end_job(self.worker, member.record, member.outcome, share_s)
        self.claims.ack(job_id, self.lane)
        self.pending.discard(job_id)
        job_end.settle(self.jobs, self.settings, self.worker.models.catalog, job_id)
