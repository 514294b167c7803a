"""Recovery: running jobs that no live worker process is running go back to their lane.

A job's record says ``running`` and names the pool process that started it
(``worker``, ``host:pid``); each pool process's heartbeat names the jobs it is
running now (``stores/fleet.py``). A running job is *unclaimed* when that
process's heartbeat has lapsed (the process or its host died) or no longer
names it (the process moved on without recording an outcome: Redis went away
while it ran and did not come back in time). Every worker's lane upkeep
sweeps the index of running jobs every ``recovery_check_s``; a job unclaimed
for ``recovery_grace_s`` is put back:

1. its record moves ``running → queued`` (``last_error`` ``worker_lost``). The
   move is the lock: of several workers recovering at once, one goes on.
2. its message is found and made runnable. Still delivered to a worker that
   will never acknowledge it (the broker's ``unacked`` hash): moved back to
   the consuming end of its lane now, rather than after the broker's
   visibility timeout. Waiting in a lane, or held in a batch claim: it runs
   from there. Nowhere: a new message is sent.

A job put back over and over fails with code ``attempts`` when it next
starts (``job_max_attempts``, ``workers/job_runner.py``).

The same sweep sends the queued jobs whose message was never sent: a record
is marked unsent when it is created, and the mark goes once the message is
out. A mark older than the grace period means the sender died in between:
unless the message is found after all, a new one is sent.

And, every ``ORPHAN_CHECK_S``, a last net under everything else: the oldest
queued jobs of each lane (queued longer than ``ORPHAN_AGE_S``, at most
``ORPHAN_BATCH``) are looked for in the lane, the broker's ``unacked`` hash
and the batch claims, in one server-side pass; a job found nowhere gets a new
message. Whatever lost a message (a fault no one foresaw), the job still runs.
"""

from __future__ import annotations

import json
import logging
import time
from typing import cast

import redis

from config.settings import LANES
from domain import keys
from domain.records import JobState
from stores import fleet
from stores.jobs import JobStore
from stores.lanes import send_job

log = logging.getLogger(__name__)

WORKER_LOST = {"code": "worker_lost", "message": "no worker was running it any more; put back on its lane"}
ORPHAN_CHECK_S = 60
ORPHAN_AGE_S = 60
ORPHAN_BATCH = 500

# KEYS: the lane lists, then the broker's unacked hash, then the batch-claim owners. ARGV: job ids.
# Returns those whose message is in none of them: the one place that answers "where is its message".
# A message's id is the first `"id": "…"` in it (the headers' id: kombu writes headers before
# properties, and no other field is "id"), so no message needs decoding.
_NOWHERE = keys.lua("""
local wanted, left = {}, #ARGV
for _, id in ipairs(ARGV) do wanted[id] = true end
local function seen(raw)
  local id = string.match(raw, '"id": ?"([%w-]+)"')
  if id and wanted[id] then wanted[id] = nil left = left - 1 end
end
local lanes = #KEYS - 2
for i = 1, lanes do
  local length = redis.call('LLEN', KEYS[i])
  for start = 0, length - 1, 1000 do
    if left == 0 then break end
    for _, raw in ipairs(redis.call('LRANGE', KEYS[i], start, start + 999)) do seen(raw) end
  end
end
if left > 0 then
  for _, raw in ipairs(redis.call('HVALS', KEYS[lanes + 1])) do seen(raw) end
end
for _, owner in ipairs(redis.call('SMEMBERS', KEYS[lanes + 2])) do
  for id, _ in pairs(wanted) do
    if redis.call('HEXISTS', '${claims}' .. owner, id) == 1 then wanted[id] = nil end
  end
end
local out = {}
for id, _ in pairs(wanted) do table.insert(out, id) end
return out
""")


class Recovery:
    """Finds unclaimed running jobs and puts them back; one per worker, run by its lane upkeep."""

    def __init__(self, client: redis.Redis, jobs: JobStore, settings, catalog=None):
        self.redis = client
        self.jobs = jobs
        self.settings = settings
        self.catalog = catalog
        self.grace_s = settings.recovery_grace_s
        self.suspects: dict[str, float] = {}  # job id -> when it was first seen unclaimed
        self._nowhere = client.register_script(_NOWHERE)
        self.orphans_checked_at = 0.0

    def sweep(self, now: float | None = None) -> list[str]:
        """Put back every job unclaimed for the grace period; return their ids."""
        now = time.time() if now is None else now
        unclaimed = self.unclaimed()
        self.suspects = {job_id: self.suspects.get(job_id, now) for job_id in unclaimed}
        due = [job_id for job_id, since in self.suspects.items() if now - since >= self.grace_s]
        return [job_id for job_id in due if self.put_back(job_id)]

    def send_unsent(self, now: float | None = None) -> list[str]:
        """Send the queued jobs whose sender died between writing the record and sending the message."""
        now = time.time() if now is None else now
        sent = []
        for job_id in self.jobs.unsent(older_than=now - self.grace_s):
            record = self.jobs.get(job_id)
            if (
                record is not None
                and record.status == JobState.QUEUED
                and not record.coalesced_with
                and self.nowhere([job_id])
            ):
                send_job(None, job_id, record.lane, self._time_limits(record.model, record.media))
                log.warning(
                    "job %s: its message was never sent (its sender stopped); sent now to the %s lane",
                    job_id,
                    record.lane,
                )
                sent.append(job_id)
            self.jobs.sent(job_id)
        return sent

    def send_orphans(self, now: float | None = None) -> list[str]:
        """Send the old queued jobs whose message is in no lane, no ``unacked`` hash and no claim."""
        now = time.time() if now is None else now
        if now - self.orphans_checked_at < ORPHAN_CHECK_S:
            return []
        self.orphans_checked_at = now
        queued = [
            i.decode()
            for lane in LANES
            for i in cast(
                "list[bytes]",
                self.redis.zrangebyscore(keys.lane_index(lane), "-inf", now - ORPHAN_AGE_S, start=0, num=ORPHAN_BATCH),
            )
        ]
        sent = []
        for job_id in self.nowhere(queued):
            record = self.jobs.get(job_id)
            if record is None or record.status != JobState.QUEUED or record.coalesced_with:
                continue
            send_job(None, job_id, record.lane, self._time_limits(record.model, record.media))
            log.warning("job %s: queued with its message in no lane, unacked hash or claim; sent again", job_id)
            sent.append(job_id)
        return sent

    def nowhere(self, job_ids: list[str]) -> list[str]:
        """Those of ``job_ids`` whose message is in no lane, no ``unacked`` hash and no batch claim."""
        if not job_ids:
            return []
        return [i.decode() for i in self._nowhere(keys=[*LANES, keys.BROKER_UNACKED, keys.CLAIM_OWNERS], args=job_ids)]

    def unclaimed(self) -> list[str]:
        """The running jobs whose process is gone, or alive and not running them."""
        running = [job_id for job_id, _ in self.jobs.running()]
        if not running:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in running:
                pipe.hmget(JobStore.key(job_id), "status", "worker")
            fields = pipe.execute()
        owners = sorted({w.decode() for _, w in fields if w})
        beats = fleet.heartbeats(self.redis, owners)
        found = []
        for job_id, (status, owner) in zip(running, fields):
            if status is None:  # the record expired or was deleted while running: nothing to run
                self.redis.zrem(keys.RUNNING, job_id)
                continue
            if status.decode() != JobState.RUNNING:
                continue
            beat = beats.get(owner.decode()) if owner else None
            if beat is not None and ("running" not in beat or job_id in beat["running"]):
                continue  # its process runs it (or is of a version that does not say: trust it)
            found.append(job_id)
        return found

    def put_back(self, job_id: str) -> bool:
        record = self.jobs.get(job_id)
        if record is None or not self.jobs.requeue(job_id, WORKER_LOST):
            return False  # it ended meanwhile, or another worker put it back
        self.suspects.pop(job_id, None)
        where = self._restore_delivered(job_id)
        if where is None and not self.nowhere([job_id]):
            where = "its message, waiting in a lane or a batch claim"
        if where is None:
            send_job(None, job_id, record.lane, self._time_limits(record.model, record.media))
            where = f"a new message on the {record.lane} lane"
        log.warning(
            "job %s: no worker was running it (it was started by %s); back on its lane via %s",
            job_id,
            record.worker or "an unknown process",
            where,
        )
        return True

    def _restore_delivered(self, job_id: str) -> str | None:
        """Move the job's message out of the broker's ``unacked`` hash to the consuming end of its lane."""
        needle = job_id.encode()
        for tag, raw in self.redis.hscan_iter(keys.BROKER_UNACKED, count=500):
            if needle not in raw:
                continue
            message, _exchange, lane = json.loads(raw)
            if (message.get("headers") or {}).get("id") != job_id or lane not in LANES:
                continue
            message["headers"]["redelivered"] = True
            message.get("properties", {}).get("delivery_info", {})["redelivered"] = True
            return self._move_to_lane(tag, raw, message, lane)
        return None

    def _move_to_lane(self, tag: bytes, raw: bytes, message: dict, lane: str) -> str | None:
        # As kombu's own restore does: in one transaction, and only if nobody acknowledged or restored it
        # meanwhile. Any other acknowledgement also touches the hash, so a conflict is tried again.
        for _ in range(20):
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(keys.BROKER_UNACKED)
                    if pipe.hget(keys.BROKER_UNACKED, tag) != raw:
                        return None  # gone from there: the lanes are looked at next
                    pipe.multi()
                    pipe.hdel(keys.BROKER_UNACKED, tag)
                    pipe.zrem(keys.BROKER_UNACKED_INDEX, tag)
                    pipe.rpush(lane, json.dumps(message))
                    pipe.execute()
                    return f"its delivered message, moved back to the {lane} lane"
                except redis.WatchError:
                    continue
        raise RuntimeError(f"the broker's unacked hash kept changing; {tag!r} is left for the next sweep")

    def _time_limits(self, model: str, media: str = "image") -> tuple[float, float]:
        try:
            return self.catalog.current().time_limits(model, self.settings, media)
        except Exception:  # no catalog here, or a model no longer in it: the deployment's limits
            if media == "video":
                return cast("tuple[float, float]", self.settings.video_time_limits)
            return self.settings.job_soft_time_limit_s, self.settings.job_hard_time_limit_s
