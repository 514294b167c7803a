"""The three lanes: depth, queue position, backpressure, and aging.

Lanes are Celery queues (``interactive``, ``default``, ``batch``) that every
worker polls in that strict order. Beside each broker list, maskq keeps a
sorted set of the ids of the jobs queued in the lane (written with the job
record, in the same transitions), so positions and depths are exact and never
count messages of jobs that were canceled or expired.

Aging: a job that has waited longer than ``lane_aging_s`` in ``default`` or
``batch`` is moved to the back of ``interactive``, so a steady stream of
interactive work delays it by at most that age plus the interactive jobs
already ahead of it. At most ``lane_aging_max_promoted`` promoted jobs wait in
the interactive lane at a time: a deep backlog gets a steady trickle, one job
after another, instead of flooding the interactive lane (an interactive job
then waits for at most the running job plus that many promoted ones). The
move takes the oldest message off the lower lane's broker list and puts it on
the interactive list in one Lua script, so a promoted job is never lost or
duplicated, however many workers promote at once.
"""

from __future__ import annotations

import math
import time
from typing import Any

import redis

from config.settings import LANES, Settings
from config.task_names import RUN_JOB
from domain import keys
from domain.errors import ServiceUnavailable
from domain.keys import PROMOTED, lane_index
from domain.records import JobRecord
from stores.jobs import JobStore

# KEYS[1]: the lower lane's broker list, KEYS[2]: the interactive broker list,
# KEYS[3]/KEYS[4]: the lower/interactive lane index, KEYS[5]: the set of promoted jobs still queued.
# ARGV: now, aging seconds, lower lane name, most promoted jobs queued at once, the interactive lane's name.
_PROMOTE = keys.lua("""
-- A promoted job whose record expired or left the queue some other way must not hold its place for ever.
for _, id in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  if redis.call('HGET', '${job}' .. id, 'status') ~= 'queued' then redis.call('SREM', KEYS[5], id) end
end
local promoted = {}
for _ = 1, 100 do
  if redis.call('SCARD', KEYS[5]) >= tonumber(ARGV[4]) then break end
  local message = redis.call('LINDEX', KEYS[1], -1)
  if not message then break end
  local ok, envelope = pcall(cjson.decode, message)
  local id = ok and envelope['headers'] and envelope['headers']['id']
  local job = id and ('${job}' .. id)
  local status = job and redis.call('HGET', job, 'status')
  if status == 'queued' then
    local since = redis.call('ZSCORE', KEYS[3], id)
    if since and tonumber(ARGV[1]) - tonumber(since) < tonumber(ARGV[2]) then break end
    redis.call('HSET', job, 'lane', ARGV[5], 'promoted_from', ARGV[3])
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZADD', KEYS[4], ARGV[1], id)
    redis.call('SADD', KEYS[5], id)
    table.insert(promoted, id)
  end
  -- Messages of jobs that ended already move too: the worker skips them in no time.
  redis.call('RPOP', KEYS[1])
  redis.call('LPUSH', KEYS[2], message)
end
return promoted
""")


class Lanes:
    """Lane-level views and actions over Redis."""

    def __init__(self, client: redis.Redis, jobs: JobStore, settings: Settings) -> None:
        self.redis = client
        self.jobs = jobs
        self.settings = settings
        self._promote = client.register_script(_PROMOTE)

    def depth(self, lane: str) -> int:
        return int(self.redis.zcard(lane_index(lane)))

    def depths(self) -> dict[str, int]:
        return {lane: self.depth(lane) for lane in LANES}

    def position(self, record: JobRecord) -> int | None:
        """How many queued jobs will start before this one (0: it is next)."""
        with self.redis.pipeline() as pipe:
            for lane in LANES:
                pipe.zcard(lane_index(lane))
            pipe.zrank(lane_index(record.lane), record.id)
            *cards, rank = pipe.execute()
        if rank is None:
            return None
        ahead = sum(int(card) for card in cards[: LANES.index(record.lane)])
        return ahead + int(rank)

    def estimated_start(self, position: int, workers: int) -> float:
        """When a job at ``position`` should start: the jobs ahead, spread over the workers."""
        mean = self.jobs.mean_duration(default=1.0)
        return time.time() + (position + 0.5) * mean / max(workers, 1)

    def check_room(self, lane: str) -> None:
        """Refuse a submission to a full lane with a 503 and a ``Retry-After`` estimate."""
        limit = self.settings.lane_max_depth[lane]
        depth = self.depth(lane)
        if depth >= limit:
            wait = self.jobs.mean_duration(default=1.0) * (depth - limit + 1)
            raise ServiceUnavailable(
                f"the {lane} lane is full ({depth} jobs queued, the limit is {limit}); try again later",
                retry_after=min(max(math.ceil(wait), 1), 300),
            )

    def promote_aged(self, now: float | None = None) -> list[str]:
        """Move jobs that waited longer than ``lane_aging_s`` in a lower lane to interactive."""
        if self.settings.lane_aging_s <= 0:
            return []
        now = now or time.time()
        promoted = []
        top, *lower = LANES  # interactive; default and batch
        for lane in lower:
            ids = self._promote(
                keys=[lane, top, lane_index(lane), lane_index(top), PROMOTED],
                args=[now, self.settings.lane_aging_s, lane, self.settings.lane_aging_max_promoted, top],
            )
            promoted += [i.decode() for i in ids]
        return promoted


def send_job(
    celery: Any,
    job_id: str,
    lane: str,
    time_limits: tuple[float, float],
    countdown: float | None = None,
    traceparent: str | None = None,
) -> None:
    """Put job ``job_id``'s message on its lane, for a worker to run; the message's id is the job's.

    The one way a job reaches a worker: a submit, a follower that leads after
    its leader ended without a result, and a job put back after an
    out-of-memory error (``countdown`` seconds later). ``celery`` is None in a
    worker, which sends with its own app. ``traceparent`` (the job's W3C trace
    context) travels in the message's headers.
    """
    if celery is None:
        from celery import current_app

        celery = current_app
    soft, hard = time_limits
    celery.send_task(
        RUN_JOB,
        args=[job_id],
        queue=lane,
        task_id=job_id,
        soft_time_limit=soft,
        time_limit=hard,
        countdown=countdown,
        headers={"traceparent": traceparent} if traceparent else None,
    )
