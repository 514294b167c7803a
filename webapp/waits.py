"""Long polls one API key may hold at once: a request that waits holds a web thread, and they are few.

``GET /v1/jobs/{id}?wait=N`` and ``POST /v1/jobs`` with ``Prefer: wait=N`` each
hold a thread for up to N seconds; an event stream (webapp/events.py) for up to
``MASKQ_MAX_STREAM_S``, and takes a slot too. Without a bound, one client could hold every
thread of every web process, and ``/healthz`` would stop answering. A key may
hold ``MASKQ_MAX_WAITS_PER_KEY`` waits at once, counted in Redis (every web
process together); each slot carries its own end time, so a process that dies
while waiting frees its slots when they end.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import redis

from domain import keys

# KEYS[1]: the key's slots. ARGV: token, now, the slot's end, most slots. 1: taken, 0: all are in use.
_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) - tonumber(ARGV[2])) + 1)
return 1
"""


@contextlib.contextmanager
def wait_slot(client: redis.Redis, client_id: str, seconds: float, most: int):
    """Yields True with a slot held for ``seconds`` (freed on exit), or False when the key holds ``most`` already."""
    key, token, now = keys.waits(client_id), uuid.uuid4().hex, time.time()
    taken = bool(client.register_script(_TAKE)(keys=[key], args=[token, now, now + seconds + 5, most]))
    try:
        yield taken
    finally:
        if taken:
            client.zrem(key, token)
