"""A storage wrapper that rides out an outage: retries with backoff, up to a bound.

A worker that has run a model on a job should not throw the result away
because the store blinked. Wrapped around the real backend for the length of
one job, every call that raises :class:`~domain.errors.StorageUnavailable` is
tried again after an exponentially growing, jittered pause, until the store
has been away for the bound (counted from the first failure since the last
success); then the last error propagates and the job fails with code
``storage``. The job's own time limit still applies, so the settings keep the
bound below it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from domain.errors import StorageUnavailable
from storage.base import Storage

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetryingStorage(Storage):
    """Delegates to ``inner``; retries each call on ``StorageUnavailable`` within ``bound_s`` in all."""

    def __init__(
        self,
        inner: Storage,
        bound_s: float,
        initial_s: float = 0.2,
        max_s: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.bound_s = bound_s
        self.initial_s = initial_s
        self.max_s = max_s
        self._sleep = sleep
        self._clock = clock
        self._outage_since: float | None = None
        self.retries = 0

    @classmethod
    def from_settings(cls, inner: Storage, settings: Settings) -> RetryingStorage:
        return cls(
            inner, settings.storage_retry_bound_s, settings.storage_retry_initial_s, settings.storage_retry_max_s
        )

    def _call(self, what: str, key: str, fn: Callable[..., T], *args: object) -> T:
        pause = self.initial_s
        while True:
            try:
                result = fn(*args)
                self._outage_since = None
                return result
            except StorageUnavailable as exc:
                now = self._clock()
                if self._outage_since is None:
                    self._outage_since = now
                left = self.bound_s - (now - self._outage_since)
                if left <= 0:
                    log.info(
                        "storage unavailable for %.1f s, past the bound of %.1f s; giving up on %s %s",
                        now - self._outage_since,
                        self.bound_s,
                        what,
                        key,
                    )
                    raise
                # Full jitter keeps a fleet of workers from hammering a store that is coming back.
                delay = min(random.uniform(pause / 2, pause), left)
                self.retries += 1
                log.info("storage unavailable (%s); retrying %s %s in %.2f s", exc.detail, what, key, delay)
                self._sleep(delay)
                pause = min(pause * 2, self.max_s)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        return self._call("put", key, self.inner.put, key, data, content_type)

    def get(self, key: str) -> bytes:
        return self._call("get", key, self.inner.get, key)

    def exists(self, key: str) -> bool:
        return self._call("exists", key, self.inner.exists, key)

    def delete(self, key: str) -> None:
        return self._call("delete", key, self.inner.delete, key)

    def delete_prefix(self, prefix: str) -> int:
        return self._call("delete under", prefix, self.inner.delete_prefix, prefix)

    def list(self, prefix: str) -> list[str]:
        return self._call("list", prefix, self.inner.list, prefix)

    def url(self, key: str) -> str | None:
        return self.inner.url(key)

    def check(self) -> None:
        return self.inner.check()

    def identity(self) -> str:
        return self.inner.identity()
