"""Workers announce themselves in Redis so the front end can tell who is ready with what."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import redis

PREFIX = "maskq:worker:"


def worker_key() -> str:
    return f"{PREFIX}{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """A daemon thread that refreshes this process's entry (with a TTL of three beats)."""

    def __init__(self, client: redis.Redis, interval_s: float, describe):
        self.redis = client
        self.interval_s = interval_s
        self.describe = describe
        self.key = worker_key()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maskq-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        body = dict(self.describe(), at=time.time())
        self.redis.set(self.key, json.dumps(body), px=int(self.interval_s * 3000))

    def stop(self) -> None:
        self._stop.set()
        try:
            self.redis.delete(self.key)
        except redis.RedisError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except redis.RedisError:
                pass  # Redis is away; the entry lapses and the worker shows as not ready


def live_workers(client: redis.Redis) -> list[dict]:
    """Every worker process whose heartbeat has not lapsed."""
    keys = list(client.scan_iter(match=PREFIX + "*", count=200))
    if not keys:
        return []
    return [dict(json.loads(v), id=k.decode()[len(PREFIX):]) for k, v in zip(keys, client.mget(keys)) if v]
