"""Image embeddings kept between jobs, so a second prompt on the same image skips the encoder."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Hashable

import numpy as np


@dataclass
class CacheStats:
    """What the cache has done since the process started (read by the heartbeat and the benchmark)."""

    hits: int = 0
    misses: int = 0
    encoder_runs: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    budget_bytes: int = 0


class EmbeddingCache:
    """An in-process LRU of encoder outputs with a byte budget.

    Keys are ``(image sha256, model name, model version)``: a new model version
    never reads an old version's embeddings. It lives in one worker process and
    is not shared: an embedding (4 MiB for SAM) is used straight from memory
    with no copy or serialisation, and a hit only helps the process that holds
    it, which is where a client's follow-up prompt usually lands when it
    comes within seconds. Embeddings are stored read-only so no caller can
    change what the next job reads.

    ``lookup`` counts hits and misses; ``store`` is called once per encoder
    run, so ``encoder_runs`` counts those. Thread-safe: the heartbeat thread
    reads :meth:`stats` while a job runs.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = max(0, int(budget_bytes))
        self._entries: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._stats = CacheStats(budget_bytes=self.budget_bytes)
        self._lock = threading.Lock()

    def lookup(self, key: Hashable) -> np.ndarray | None:
        """The embedding stored under ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self._stats.hits += 1
            return value

    def store(self, key: Hashable, embedding: np.ndarray, encoded: bool = True) -> None:
        """Keep an embedding (made read-only), evicting the least recently used to fit.

        ``encoded``: it comes from an encoder run here (counted), not from the
        shared store. An embedding larger than the whole budget is not kept (a
        budget of 0 turns the cache off).
        """
        embedding.flags.writeable = False  # the caller hands it over; nobody may change it now
        with self._lock:
            if encoded:
                self._stats.encoder_runs += 1
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if embedding.nbytes > self.budget_bytes:
                return
            while self._entries and self._bytes + embedding.nbytes > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._stats.evictions += 1
            self._entries[key] = embedding
            self._bytes += embedding.nbytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._stats.entries = len(self._entries)
            self._stats.bytes = self._bytes
            return asdict(self._stats)

    def __len__(self) -> int:
        return len(self._entries)
