"""The worker fleet as it records itself in Redis: who is alive with which models, and whose gate is open.

Worker processes write these records (``workers/heartbeat.py``,
``workers/gate.py``); the web front end and other workers read them here. The
web never imports the worker runtime to learn about workers.

- A *heartbeat* is one JSON value per pool process, ``maskq:worker:{host}:{pid}``,
  refreshed every beat with a TTL of three beats: the models it has loaded,
  their load errors, its embedding-cache counters, the ids of the jobs it is
  running now (``running``), and ``at``. A process writes it at once when it
  starts or ends a job, so ``running`` is never behind its records.
- A *gate state* is one JSON value per worker (main process),
  ``maskq:gate:worker:{name}``: open or closed, free and needed memory.
"""
from __future__ import annotations

import json
import os
import socket

import redis

from domain import keys


def this_process() -> str:
    """This process's name in the fleet: ``host:pid`` (also the owner name of its batch claims)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def write_heartbeat(client: redis.Redis, owner: str, body: dict, ttl_s: float) -> None:
    client.set(keys.worker(owner), json.dumps(body), px=int(ttl_s * 1000))


def forget_heartbeat(client: redis.Redis, owner: str) -> None:
    client.delete(keys.worker(owner))


def is_alive(client: redis.Redis, owner: str) -> bool:
    """Whether the pool process ``owner`` has beaten within its heartbeat's lifetime."""
    return bool(client.exists(keys.worker(owner)))


def heartbeats(client: redis.Redis, owners: list[str]) -> dict[str, dict]:
    """The live heartbeats of ``owners`` (one round trip); a lapsed one is absent."""
    if not owners:
        return {}
    values = client.mget([keys.worker(owner) for owner in owners])
    return {owner: json.loads(v) for owner, v in zip(owners, values) if v}


def live_workers(client: redis.Redis) -> list[dict]:
    """Every worker process whose heartbeat has not lapsed, each with its ``id`` (``host:pid``)."""
    found = list(client.scan_iter(match=keys.WORKER_PREFIX + "*", count=200))
    if not found:
        return []
    return [dict(json.loads(v), id=k.decode()[len(keys.WORKER_PREFIX):]) for k, v in zip(found, client.mget(found)) if v]


def write_gate(client: redis.Redis, worker_name: str, state: dict, ttl_s: float) -> None:
    client.set(keys.gate(worker_name), json.dumps(state), px=int(ttl_s * 1000))


def gate_states(client: redis.Redis) -> dict[str, dict]:
    """Each live worker's gate, by worker name."""
    found = list(client.scan_iter(match=keys.GATE_PREFIX + "*", count=200))
    values = client.mget(found) if found else []
    return {k.decode()[len(keys.GATE_PREFIX):]: json.loads(v) for k, v in zip(found, values) if v}


def reserve_override(client: redis.Redis) -> float | None:
    """The gate reserve an operator set at run time (``SET maskq:gate:reserve_mb 256``), if any."""
    value = client.get(keys.GATE_RESERVE_MB)
    return float(value) if value is not None else None
