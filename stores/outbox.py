"""The webhook outbox: every delivery is written down in the same step as the event it announces, queued after.

A message (``stores/delivery_log.py``) is born with an entry in the outbox
(``keys.WEBHOOK_OUTBOX``, message ids by the time their lease runs out). For a
job's event the entry is written by the record's own state move
(:data:`QUEUE_JOB_EVENT_LUA`, inside the transition script of
``stores/jobs.py``); for anything else (a ``batch.completed``, a result-cache
hit) by :meth:`Outbox.add`, with the message. Whoever wrote it holds the entry
for :data:`LEASE_S` and queues the first delivery attempt at once (the fast
path, ``stores/webhooks.py``); only then is the entry removed. A process that
dies in between leaves the entry behind; once its lease runs out, a worker's
upkeep takes it (:meth:`Outbox.take`, another lease) and queues it again
under the same message id, so a receiver sees at most duplicates it can drop
by ``webhook-id``, never a lost event and never one event under two ids.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import cast

import redis

from domain import keys
from domain.schemas import DEFAULT_JOB_EVENTS
from domain.webhooks import DEFAULT_TTL_S, EVENT_OF_STATE

LEASE_S = 30  # how long an entry's writer (or taker) has to queue it before upkeep queues it again
# The event each state a job moves into announces (domain/webhooks.py), and the events a webhook that
# names none gets, the request's default (domain/schemas.py): written into the script below.
EVENT_OF_STATUS = {str(state): event for state, event in EVENT_OF_STATE.items()}


def _lua_literal(value: Mapping[str, str] | Iterable[str]) -> str:
    """A Lua table (or string) literal for plain ASCII data: JSON's string syntax is Lua's too."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in value.items()) + "}"
    return "{" + ", ".join(json.dumps(v) for v in value) + "}"


# Part of the job's transition script (stores/jobs.py): after the move, with KEYS[1] the job's hash,
# ARGV[2] the new status and ARGV[4] now. Leaves the new message's id in ``webhook_message`` ('' if none),
# which the script returns. The message's fields are Message's (stores/delivery_log.py); a job.started
# also keeps the record as it is now, its body (an ending event's body is built at its first attempt).
QUEUE_JOB_EVENT_LUA = """
local webhook_message = ''
do
  local event = (EVENT_OF_STATUS)[ARGV[2]]
  local job = event and redis.call('HMGET', KEYS[1], 'id', 'tenant', 'request')
  local ok, request = pcall(cjson.decode, job and job[3] or 'null')
  local hook = ok and type(request) == 'table' and request['webhook']
  if type(hook) == 'table' and type(hook['url']) == 'string' and hook['url'] ~= '' then
    local events = hook['events']
    if type(events) ~= 'table' or #events == 0 then events = DEFAULT_EVENTS end
    local wanted = false
    for _, name in ipairs(events) do wanted = wanted or name == event end
    if wanted then
      local now, ttl = tonumber(ARGV[4]), redis.call('TTL', KEYS[1])
      if ttl <= 0 then ttl = DEFAULT_TTL_S end
      local n = redis.call('INCR', '${webhook_sequence}')
      webhook_message = 'msg_' .. string.sub(redis.sha1hex(job[1] .. '|' .. event .. '|' .. n), 1, 32)
      local message = '${webhook_message}' .. webhook_message
      redis.call('HSET', message, 'id', webhook_message, 'job_id', job[1], 'tenant', job[2], 'event', event,
                 'url', hook['url'], 'body', '', 'status', 'pending', 'generation', '0', 'created_at', ARGV[4],
                 'expires_at', tostring(now + ttl))
      if event == 'job.started' then
        redis.call('HSET', message, 'snapshot', cjson.encode(redis.call('HGETALL', KEYS[1])))
      end
      redis.call('EXPIRE', message, ttl)
      redis.call('RPUSH', '${job}' .. job[1] .. ':deliveries', webhook_message)
      redis.call('EXPIRE', '${job}' .. job[1] .. ':deliveries', ttl)
      redis.call('ZADD', '${webhook_outbox}', now + LEASE_S, webhook_message)
    end
  end
end
"""
for _name, _value in (
    ("EVENT_OF_STATUS", _lua_literal(EVENT_OF_STATUS)),
    ("DEFAULT_EVENTS", _lua_literal(DEFAULT_JOB_EVENTS)),
    ("DEFAULT_TTL_S", str(DEFAULT_TTL_S)),
    ("LEASE_S", str(LEASE_S)),
):
    QUEUE_JOB_EVENT_LUA = QUEUE_JOB_EVENT_LUA.replace(_name, _value)

_ADD = """
-- KEYS: the message, its subject's deliveries, the outbox. ARGV: message id, lease end, ttl, field/value pairs.
-- A message that exists already is left alone: one event, one message, one id.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""

_TAKE = """
-- KEYS[1]: the outbox. ARGV: now, lease seconds, most. Entries whose lease ran out, each leased again.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[2], id)
end
return due
"""


class Outbox:
    """The outbox's entries: added with their message, taken when their lease ran out, removed once queued."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._add = client.register_script(_ADD)
        self._take = client.register_script(_TAKE)

    def add(self, message_id: str, fields: dict[str, str], deliveries_key: str, ttl_s: int) -> bool:
        """Write message ``message_id`` (``fields``) and its entry, held by the caller; False if it existed."""
        pairs = [part for item in fields.items() for part in item]
        return bool(
            self._add(
                keys=[keys.webhook_message(message_id), deliveries_key, keys.WEBHOOK_OUTBOX],
                args=[message_id, time.time() + LEASE_S, ttl_s, *pairs],
            )
        )

    def take(self, now: float | None = None, most: int = 100) -> list[str]:
        """The ids of the entries whose lease ran out (their queuer died or failed), each taken for :data:`LEASE_S`."""
        taken = self._take(keys=[keys.WEBHOOK_OUTBOX], args=[now or time.time(), LEASE_S, most])
        return [m.decode() for m in taken]

    def sent(self, message_id: str) -> None:
        """The message's first attempt is queued: the entry is done."""
        self.redis.zrem(keys.WEBHOOK_OUTBOX, message_id)

    def entries(self) -> list[tuple[str, float]]:
        """``(message id, lease end)`` of every entry, soonest first."""
        entries = cast("list[tuple[bytes, float]]", self.redis.zrange(keys.WEBHOOK_OUTBOX, 0, -1, withscores=True))
        return [(m.decode(), at) for m, at in entries]
