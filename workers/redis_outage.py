"""Riding out a Redis outage inside a job: keep what was done, and write it once Redis answers again.

A job whose model has run must not lose its outcome because Redis restarted
meanwhile (an upgrade, a failover, a crash): :func:`ride_out` tries the write
again with a growing pause until Redis answers or ``bound_s`` has passed.
Until then the task does not return, so its message is not acknowledged; if
the bound passes (or the job's hard time limit kills the process first), the
message is still in the broker's ``unacked`` hash, and recovery
(``workers/recovery.py``) puts the job back on its lane: nothing vanishes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from celery.exceptions import SoftTimeLimitExceeded

log = logging.getLogger(__name__)

T = TypeVar("T")
# What a Redis that is down, restarting or still loading its AOF raises (BusyLoadingError is a ConnectionError).
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)


def cut_off(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis cannot take the write now: unreachable, or a primary that lost its replicas.

    With ``min-replicas-to-write`` (README, "Scaling out"), a primary cut off from its replicas refuses writes
    (``NOREPLICAS``) instead of taking writes that the failover will throw away; once the Sentinels make
    it a replica, the next write is ``READONLY``, which redis-py's Sentinel client turns into a reconnect to
    the new primary. Either way, waiting is right.
    """
    return isinstance(exc, UNREACHABLE) or (isinstance(exc, redis.ResponseError) and "NOREPLICAS" in str(exc))


def ride_out(
    action: Callable[[], T],
    *,
    bound_s: float,
    what: str,
    initial_s: float = 0.1,
    max_s: float = 2.0,
    sleep=time.sleep,
    clock=time.monotonic,
) -> T:
    """``action()``, tried again while Redis is unreachable (:func:`cut_off`), for ``bound_s`` seconds at most.

    The job's soft time limit does not interrupt the retries: its result is
    already paid for, and giving up would only mean running it again. Past
    the bound the last error is raised.
    """
    deadline = clock() + bound_s
    pause, failures = initial_s, 0
    while True:
        try:
            result = action()
            if failures:
                log.info("%s: Redis answered again after %d failed attempt(s)", what, failures)
            return result
        except redis.RedisError as exc:
            if not cut_off(exc):
                raise
            failures += 1
            if clock() + pause > deadline:
                log.error("%s: Redis unreachable for %.0f s; giving up (%s)", what, bound_s, exc)
                raise
            if failures == 1:
                log.warning("%s: Redis unreachable (%s); trying again for up to %.0f s", what, exc, bound_s)
        except SoftTimeLimitExceeded:
            log.info("%s: soft time limit passed while waiting for Redis; still waiting", what)
            continue
        try:
            sleep(pause)
        except SoftTimeLimitExceeded:
            pass
        pause = min(pause * 2, max_s)
