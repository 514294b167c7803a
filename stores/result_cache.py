"""The result cache, and the coalescing of identical jobs submitted while one of them is in flight.

Two jobs are *the same* when they would give the same result: the same image
bytes (SHA-256), the same prompts and outputs (canonical JSON of the validated
request; lane, webhook and deadline do not change a result), the same model
name and version, and the same tenant. ``domain.result_keys.cache_key`` turns
that into one digest.

- **Cache.** When a job that ran the model succeeds, an entry
  ``maskq:cache:entry:{digest}`` names it for ``result_cache_ttl_s``. A later
  identical submission gets a job of its own, created ``succeeded`` with
  ``cached: true`` and the first job's ``result_key``, without storing or
  queueing anything. Entries are indexed by insertion time in
  ``maskq:cache:index`` and the oldest go when there are more than
  ``result_cache_max_entries``. An entry only points at a result; a hit is
  served only while the job it points at still exists and succeeded, and it
  lives no longer than that job's objects are kept (``retention_s``).
- **Coalescing.** While a job is queued or running, ``maskq:cache:inflight:{digest}``
  names it (set in a script, like ``SET NX``: of identical submissions at the
  same instant exactly one leads). An identical job submitted meanwhile is a
  *follower*: its record is ``queued`` with ``coalesced_with`` naming the
  leader, it is not sent to a worker, and it is in no lane index (it takes no
  worker's time, so it does not count in lane depth; its ``queue_position`` is
  its leader's). It does not follow a leader queued in a lower lane than its
  own. When the leader succeeds, each follower moves ``queued → succeeded``
  with the leader's result (``cached: true``, webhooks fire); when the leader
  ends any other way (failed, canceled, expired, or run by a fallback model),
  the first follower still queued leads in its place and is sent to a worker,
  and the others follow it. A follower can be canceled on its own. A leader
  found ended and never settled (its process died) is taken over by the next
  identical submission, with its followers.

:meth:`ResultCache.settle` does the work at a job's end; it may run any
number of times for a job, in any process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

import redis

from config.settings import LANES, Settings
from domain import keys
from domain.keys import cache_entry as entry_key
from domain.keys import cache_followers as followers_key
from domain.keys import cache_inflight as inflight_key
from domain.keys import job_prefix
from domain.records import JobRecord, JobState
from domain.result_keys import cache_key
from domain.schemas import JobRequest
from stores.jobs import JobStore
from stores.lanes import send_job
from stores.webhooks import notify

log = logging.getLogger(__name__)

INDEX = keys.CACHE_INDEX
# What a hit's job may be created with at the least: a shorter-lived one would vanish under its client.
MIN_LIFETIME_S = 60
# A leader that succeeded this long ago and still holds its in-flight key was never settled: take over.
STALE_AFTER_S = 30
NO_KEY = inflight_key("-")


# KEYS[1]: the entry. The job it names, if that job still exists and succeeded.
_LOOKUP = keys.lua("""
local id = redis.call('GET', KEYS[1])
if not id then return false end
local f = redis.call('HMGET', '${job}' .. id, 'status', 'result_key', 'instances', 'model_version',
                     'input_key', 'created_at', 'width', 'height')
if f[1] ~= 'succeeded' or not f[2] then
  redis.call('DEL', KEYS[1])
  return false
end
return {id, f[2], f[3] or '0', f[4] or '', f[5], f[6], f[7], f[8]}
""")

# KEYS[1]: the entry, KEYS[2]: the index. ARGV: job id, entry ttl, now, max entries, digest, configured ttl.
_REMEMBER = keys.lua("""
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[3]) - tonumber(ARGV[6]))
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #popped, 2 do redis.call('DEL', '${cache_entry}' .. popped[i]) end
end
return over
""")

# KEYS[1]: the in-flight key, KEYS[2]: the new job's hash. ARGV: job id, ttl, now, stale seconds, then the
# lanes a queued leader may wait in for this job to follow it (its own and higher: never behind a lower lane).
# Returns {'lead'} | {'alone'} | {'follow', leader id}.
_JOIN = keys.lua("""
local me = ARGV[1]
local leader = redis.call('GET', KEYS[1])
if leader and leader ~= me then
  local f = redis.call('HMGET', '${job}' .. leader, 'status', 'lane', 'finished_at')
  local status = f[1]
  local follow = status == 'running'
  if status == 'queued' then
    for i = 5, #ARGV do if ARGV[i] == f[2] then follow = true end end
    if not follow then return {'alone'} end
  elseif status == 'succeeded' and tonumber(ARGV[3]) - tonumber(f[3] or '0') < tonumber(ARGV[4]) then
    follow = true  -- its settle is on the way and will take this job too
  end
  if follow then
    redis.call('RPUSH', '${cache_followers}' .. leader, me)
    redis.call('EXPIRE', '${cache_followers}' .. leader, ARGV[2])
    redis.call('HSET', KEYS[2], 'coalesced_with', leader)
    redis.call('ZREM', '${lane}' .. redis.call('HGET', KEYS[2], 'lane'), me)
    return {'follow', leader}
  end
  -- The leader is gone, or ended without being settled: this job leads, and adopts its followers.
  local old = '${cache_followers}' .. leader
  for _, id in ipairs(redis.call('LRANGE', old, 0, -1)) do
    if redis.call('HGET', '${job}' .. id, 'status') == 'queued' then
      redis.call('HSET', '${job}' .. id, 'coalesced_with', me)
      redis.call('RPUSH', '${cache_followers}' .. me, id)
    end
  end
  redis.call('DEL', old)
  redis.call('EXPIRE', '${cache_followers}' .. me, ARGV[2])
end
redis.call('SET', KEYS[1], me, 'EX', ARGV[2])
return {'lead'}
""")

# KEYS[1]: the in-flight key, KEYS[2]: the leader's followers. ARGV[1]: the leader. The followers, taken.
_TAKE = keys.lua("""
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
local ids = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
return ids
""")

# KEYS as _TAKE. ARGV: the old leader, ttl, now. The leader ended without a result: the first follower
# still queued leads now (back in its lane's index), the others follow it. Returns the new leader first.
_HAND_OFF = keys.lua("""
local ids = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
local waiting = {}
for _, id in ipairs(ids) do
  if redis.call('HGET', '${job}' .. id, 'status') == 'queued' then table.insert(waiting, id) end
end
local owns = redis.call('GET', KEYS[1]) == ARGV[1]
if #waiting == 0 then
  if owns then redis.call('DEL', KEYS[1]) end
  return {}
end
local new = waiting[1]
local job = '${job}' .. new
redis.call('HDEL', job, 'coalesced_with')
redis.call('ZADD', '${lane}' .. redis.call('HGET', job, 'lane'), ARGV[3], new)
if owns then redis.call('SET', KEYS[1], new, 'EX', ARGV[2]) end
for i = 2, #waiting do
  redis.call('HSET', '${job}' .. waiting[i], 'coalesced_with', new)
  redis.call('RPUSH', '${cache_followers}' .. new, waiting[i])
end
if #waiting > 1 then redis.call('EXPIRE', '${cache_followers}' .. new, ARGV[2]) end
return waiting
""")


@dataclass(frozen=True)
class CachedResult:
    """The job a cache entry names: its result, and what is known of its image (the same bytes)."""

    job_id: str
    result_key: str
    instances: int
    model_version: str
    input_key: str
    created_at: float
    width: int
    height: int


class TimeLimits(Protocol):
    def time_limits(self, name: str | None, settings: Settings) -> tuple[float, float]: ...


class Catalog(Protocol):
    """What the cache needs of the model catalog (``models.catalog``, a layer above): its time limits."""

    def current(self) -> TimeLimits: ...


class ResultCache:
    """The result cache and in-flight coalescing over Redis; see the module's docstring.

    Built per use (it holds no state of its own): by the web front end with its
    ``Services``, by a worker with :func:`workers.job_end.settle`. ``catalog`` and
    ``celery`` are needed only to send a follower that became a leader to a worker.
    """

    def __init__(self, jobs: JobStore, settings: Settings, catalog: Catalog | None = None, celery: Any = None) -> None:
        self.jobs = jobs
        self.redis: redis.Redis = jobs.redis
        self.settings = settings
        self.catalog = catalog
        self.celery = celery
        self.enabled = settings.result_cache_enabled
        self._lookup = self.redis.register_script(_LOOKUP)
        self._remember = self.redis.register_script(_REMEMBER)
        self._join = self.redis.register_script(_JOIN)
        self._take = self.redis.register_script(_TAKE)
        self._hand_off = self.redis.register_script(_HAND_OFF)

    # -- submit ---------------------------------------------------------------------------------

    def key_for(self, request: JobRequest, *, image_sha256: str, model: str, version: str, tenant: str) -> str | None:
        """The job's :func:`cache_key`, or None while the cache is off."""
        if not self.enabled:
            return None
        return cache_key(request, image_sha256=image_sha256, model=model, version=version, tenant=tenant)

    def find(self, key: str | None) -> CachedResult | None:
        """The result the cache holds for ``key``, if its job still exists, succeeded, and is kept a while yet."""
        if key is None:
            return None
        found = self._lookup(keys=[entry_key(key)])
        if not found:
            return None
        job_id, result_key, instances, version, input_key, created_at, width, height = (v.decode() for v in found)
        cached = CachedResult(
            job_id, result_key, int(instances), version, input_key, float(created_at), int(width), int(height)
        )
        return cached if self._lifetime_s(cached.created_at, time.time()) >= MIN_LIFETIME_S else None

    def serve(self, record: JobRecord, cached: CachedResult) -> JobRecord:
        """Write ``record``, a new job identical to ``cached``'s, as already succeeded with its result."""
        now = time.time()
        hit = replace(
            record,
            status=JobState.SUCCEEDED,
            cached=True,
            result_key=cached.result_key,
            instances=cached.instances,
            model_version=cached.model_version or record.model_version,
            input_key=cached.input_key,
            finished_at=now,
            deadline_at=None,
            cache_key=None,
            coalesced_with=None,
        )
        # Its result lives in the other job's folder, which goes when that job does.
        self.jobs.create(hit, ttl_s=min(self.jobs.ttl_s, self._lifetime_s(cached.created_at, now)))
        log.info("job %s: served from the result cache (the result of job %s)", hit.id, cached.job_id)
        notify(hit, "job.succeeded", self.redis, self.celery)  # created ended: no move fires its webhook
        return hit

    def join(self, record: JobRecord) -> str | None:
        """For a job just created ``queued``: the id of the identical job it now follows, or None.

        None means: send it to a worker (it leads, or an identical job waits in a lower lane).
        """
        if not self.enabled or record.cache_key is None:
            return None
        higher_or_same = LANES[: LANES.index(record.lane) + 1]
        answer = self._join(
            keys=[inflight_key(record.cache_key), JobStore.key(record.id)],
            args=[record.id, self.settings.job_ttl_s, time.time(), STALE_AFTER_S, *higher_or_same],
        )
        if answer[0] != b"follow":
            return None
        record.coalesced_with = answer[1].decode()
        log.info(
            "job %s: identical to job %s, which is in flight; waiting for its result", record.id, record.coalesced_with
        )
        return record.coalesced_with

    # -- when a job ends ----------------------------------------------------------------------

    def settle(self, job_id: str) -> None:
        """After job ``job_id`` ended: fill the cache, and resolve the jobs that wait on it.

        Does nothing while the job is queued or running; safe to repeat.
        """
        record = self.jobs.get(job_id)
        if record is not None and not record.status.ended:
            return
        inflight = inflight_key(record.cache_key) if record is not None and record.cache_key else NO_KEY
        if record is not None and self._ran_the_model(record):
            self.remember(record)
            followers = [f.decode() for f in self._take(keys=[inflight, followers_key(job_id)], args=[job_id])]
            for follower in followers:
                self._share_result(follower, record)
            return
        waiting = self._hand_off(
            keys=[inflight, followers_key(job_id)], args=[job_id, self.settings.job_ttl_s, time.time()]
        )
        if waiting:
            new = waiting[0].decode()
            log.info(
                "job %s: ended %s; job %s, identical, runs in its place (%d waiting on it)",
                job_id,
                record.status if record else "and gone",
                new,
                len(waiting) - 1,
            )
            self._send(new)

    def remember(self, record: JobRecord) -> bool:
        """Make ``record``'s result (a job that ran the model and succeeded) the cached one for its key."""
        if not self.enabled or record.cache_key is None:
            return False
        now = time.time()
        lifetime = self._lifetime_s(record.created_at, now)
        if lifetime < MIN_LIFETIME_S:
            return False
        ttl = min(self.settings.result_cache_ttl_s, lifetime)
        # The key of what actually ran: the model version is the worker's, which may be newer than the submit's.
        digest = cache_key(
            record.request,
            image_sha256=record.image_sha256,
            model=record.model,
            version=record.model_version,
            tenant=record.tenant,
        )
        evicted = self._remember(
            keys=[entry_key(digest), INDEX],
            args=[
                record.id,
                ttl,
                now,
                self.settings.result_cache_max_entries,
                digest,
                self.settings.result_cache_ttl_s,
            ],
        )
        if evicted > 0:
            log.info(
                "result cache: %d oldest entr%s evicted (the bound is %d)",
                evicted,
                "y" if evicted == 1 else "ies",
                self.settings.result_cache_max_entries,
            )
        return True

    # -- helpers --------------------------------------------------------------------------------

    def _ran_the_model(self, record: JobRecord) -> bool:
        # Not a hit or a coalesced job (their result is another's), nor a degraded run on a fallback model.
        own = job_prefix(record.tenant, record.id)
        return (
            record.status == JobState.SUCCEEDED
            and not record.cached
            and record.model_used is None
            and record.result_key is not None
            and record.result_key.startswith(own)
        )

    def _share_result(self, follower_id: str, leader: JobRecord) -> None:
        moved, _ = self.jobs.move(
            follower_id,
            JobState.SUCCEEDED,
            {JobState.QUEUED},
            finished_at=time.time(),
            result_key=leader.result_key,
            instances=leader.instances or 0,
            model_version=leader.model_version,
            cached="true",
            coalesced_with=leader.id,  # "true": the record's hash keeps booleans as JSON
        )
        if not moved:
            return  # canceled or expired while it waited
        lifetime = self._lifetime_s(leader.created_at, time.time())
        if lifetime < self.redis.ttl(JobStore.key(follower_id)):
            self.redis.expire(JobStore.key(follower_id), max(lifetime, 1))
        log.info("job %s: succeeded with the result of job %s", follower_id, leader.id)

    def _send(self, job_id: str) -> None:
        record = self.jobs.get(job_id)
        if record is None:
            return
        limits = (self.settings.job_soft_time_limit_s, self.settings.job_hard_time_limit_s)
        if self.catalog is not None:
            try:
                limits = self.catalog.current().time_limits(record.model, self.settings)
            except Exception:  # a model no longer in the manifest: the worker fails the job with its reason
                pass
        send_job(self.celery, job_id, record.lane, limits)

    def _lifetime_s(self, created_at: float, now: float) -> int:
        """Seconds until the job created at ``created_at`` (its record or its objects) is gone."""
        return int(created_at + min(self.settings.job_ttl_s, self.settings.retention_s) - now)
