"""The worker fleet as it records itself in Redis: who is alive with which models, and whose gate is open.

Worker processes write these records (``workers/heartbeat.py``,
``workers/gate.py``); the web front end and other workers read them here. The
web never imports the worker runtime to learn about workers.

- A *heartbeat* is one JSON entry per pool process (``host:pid``) in the hash
  ``maskq:workers``, refreshed every beat and lapsing after three: the models
  it has loaded, their load errors, its embedding-cache counters, the ids of
  the jobs it is running now (``running``), and ``at``. A process writes it at
  once when it starts or ends a job, so ``running`` is never behind its records.
- A *gate state* is one JSON entry per worker (main process) in ``maskq:gates``:
  open or closed, free and needed memory.

Each hash has a sorted set of when each entry lapses, written and read in Lua
with Redis's own clock (hosts' clocks need not agree): every read is one call,
whatever else the keyspace holds, and drops lapsed entries as it goes.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import redis

from domain import keys

# KEYS[1]: the hash, KEYS[2]: its lapse set. ARGV: member, JSON, seconds until it lapses.
_WRITE = """
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], tonumber(now[1]) + tonumber(now[2]) / 1e6 + tonumber(ARGV[3]), ARGV[1])
"""

# KEYS as _WRITE. ARGV: the members to read (none: all). Returns {member, JSON, ...} of the live ones.
_READ = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[1], gone)
  redis.call('ZREM', KEYS[2], gone)
end
if #ARGV == 0 then return redis.call('HGETALL', KEYS[1]) end
local out = {}
for _, member in ipairs(ARGV) do
  local value = redis.call('HGET', KEYS[1], member)
  if value then table.insert(out, member) table.insert(out, value) end
end
return out
"""


def this_process() -> str:
    """This process's name in the fleet: ``host:pid`` (also the owner name of its batch claims)."""
    return process_name(os.getpid())


def process_name(pid: int) -> str:
    """The fleet name of process ``pid`` of this host (a worker's main process names its pool's so)."""
    return f"{socket.gethostname()}:{pid}"


def _write(
    client: redis.Redis, hash_key: str, lapse_key: str, member: str, value: dict[str, Any], ttl_s: float
) -> None:
    client.register_script(_WRITE)(keys=[hash_key, lapse_key], args=[member, json.dumps(value), ttl_s])


def _read(
    client: redis.Redis, hash_key: str, lapse_key: str, members: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    flat = client.register_script(_READ)(keys=[hash_key, lapse_key], args=members or [])
    return {flat[i].decode(): json.loads(flat[i + 1]) for i in range(0, len(flat), 2)}


def write_heartbeat(client: redis.Redis, owner: str, body: dict[str, Any], ttl_s: float) -> None:
    _write(client, keys.WORKERS, keys.WORKERS_LAPSE, owner, body, ttl_s)


def forget_heartbeat(client: redis.Redis, owner: str) -> None:
    with client.pipeline() as pipe:
        pipe.hdel(keys.WORKERS, owner)
        pipe.zrem(keys.WORKERS_LAPSE, owner)
        pipe.execute()


def is_alive(client: redis.Redis, owner: str) -> bool:
    """Whether the pool process ``owner`` has beaten within its heartbeat's lifetime."""
    return owner in heartbeats(client, [owner])


def heartbeats(client: redis.Redis, owners: list[str]) -> dict[str, dict[str, Any]]:
    """The live heartbeats of ``owners`` (one call); a lapsed one is absent."""
    if not owners:
        return {}
    return _read(client, keys.WORKERS, keys.WORKERS_LAPSE, owners)


def live_workers(client: redis.Redis) -> list[dict[str, Any]]:
    """Every worker process whose heartbeat has not lapsed, each with its ``id`` (``host:pid``)."""
    return [dict(body, id=owner) for owner, body in _read(client, keys.WORKERS, keys.WORKERS_LAPSE).items()]


def write_gate(client: redis.Redis, worker_name: str, state: dict[str, Any], ttl_s: float) -> None:
    _write(client, keys.GATES, keys.GATES_LAPSE, worker_name, state, ttl_s)


def gate_states(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """Each live worker's gate, by worker name."""
    return _read(client, keys.GATES, keys.GATES_LAPSE)


def reserve_override(client: redis.Redis) -> float | None:
    """The gate reserve an operator set at run time (``SET maskq:gate:reserve_mb 256``), if any."""
    value = client.get(keys.GATE_RESERVE_MB)
    return float(value) if value is not None else None
