"""A worker pool process announces itself in Redis, so the front end can tell who is ready with what."""

from __future__ import annotations

import logging
import threading
import time

import redis

from stores import fleet

log = logging.getLogger(__name__)


class Heartbeat:
    """A daemon thread that refreshes this process's heartbeat (with a TTL of three beats)."""

    def __init__(self, client: redis.Redis, interval_s: float, describe):
        self.redis = client
        self.interval_s = interval_s
        self.describe = describe
        self.owner = fleet.this_process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maskq-heartbeat", daemon=True)

    def start(self) -> None:
        try:
            self.beat()
        except redis.RedisError:
            pass  # Redis is away: the thread beats once it is back
        self._thread.start()

    def beat(self) -> None:
        fleet.write_heartbeat(self.redis, self.owner, dict(self.describe(), at=time.time()), 3 * self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        try:
            fleet.forget_heartbeat(self.redis, self.owner)
        except redis.RedisError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except redis.RedisError:
                pass  # Redis is away; the entry lapses and the worker shows as not ready
            except (
                Exception
            ):  # whatever else went wrong, the next beat tries again: a dead thread means a "dead" worker
                log.exception("heartbeat failed")
