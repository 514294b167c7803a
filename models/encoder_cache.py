"""What a model's encoder made of an input, kept so that the next job on that input skips the encoder.

One cache per worker process (:class:`EncoderCache`), in two tiers:

- **local**: this process's memory, least recently used out past a byte
  budget. An entry is used straight from memory, no copy or serialisation;
  its arrays are read-only so no job can change what the next one reads.
- **shared** (optional, :class:`SharedEncodings`): Redis, read by every
  worker process and host, each array stored as float16 when it is a float
  (half the bytes; SAM's masks from them match float32 ones, see
  docs/benchmarks.md), with a TTL and a bound in MB, least recently used out
  (one Lua script, so concurrent writers agree). A store that fails (Redis
  away) is a miss, never an error: the encoder runs instead.

An entry is keyed by :class:`EncodingKey`: the encoder *part*'s identity (the
sha256 of its file, which the manifest's ``sha256`` table gives, with a note
of any preprocessing that differs from the part's usual one), the tenant (a
tenant never reads another's) and the input's hash (the image's sha256, a
hash of its pixels, or of a text phrase: :func:`phrase_hash`). So two models
on the same encoder file share entries, and a new version of a model that
kept its encoder keeps its entries; a new encoder file starts afresh. An
entry holds named arrays (``{"image_embeddings": ...}``; SAM 2's encoder
gives three).

An adapter takes its part's view with :meth:`EncoderCache.part` at set-up:
:class:`EncoderPart` looks up, stores, and counts for its model (hits,
misses, encoder runs: the heartbeat's ``embedding_caches``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from domain import keys

if TYPE_CHECKING:
    import redis

    from config.settings import Settings

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
LocalKey = tuple[str | None, str]  # (tenant, input hash): a part's local entries are keyed by these


class EncodingSource(StrEnum):
    """Where an encoding came from when the encoder did not run: what a job's result reports (the value)."""

    LOCAL = "this worker"
    SHARED = "shared"

    @property
    def metric(self) -> str:
        """Its label in ``maskq_worker_embedding_cache_lookups`` (``local``, ``shared``; a miss is ``miss``)."""
        return self.name.lower()


@dataclass(frozen=True)
class EncodingKey:
    """One entry: the encoder part, the tenant, the input."""

    part: str
    tenant: str | None
    input: str


def phrase_hash(text: str) -> str:
    """A text encoder's input hash: the phrase as given (a text encoder sees case and spaces)."""
    return "text:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def pixels_hash(image: np.ndarray) -> str:
    """An image's input hash when the caller gave no content hash: its pixels and shape."""
    digest = hashlib.sha256(np.ascontiguousarray(image).data)
    digest.update(repr(image.shape).encode())
    return "pixels:" + digest.hexdigest()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def nbytes(arrays: Arrays) -> int:
    return sum(a.nbytes for a in arrays.values())


@dataclass
class CacheStats:
    """What one model's view of the cache has done since the process started (heartbeat, benchmarks)."""

    hits: int = 0
    misses: int = 0
    encoder_runs: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    budget_bytes: int = 0


class LocalEncodings:
    """One part's entries in this process: an LRU of named arrays within a byte budget. Thread-safe."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = max(0, int(budget_bytes))
        self.evictions = 0
        self._entries: OrderedDict[LocalKey, Arrays] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: LocalKey) -> Arrays | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: LocalKey, arrays: Arrays) -> None:
        """Keep ``arrays`` (made read-only), evicting the least recently used to fit; too large: not kept."""
        for array in arrays.values():
            array.flags.writeable = False  # the caller hands them over; nobody may change them now
        size = nbytes(arrays)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= nbytes(old)
            if size > self.budget_bytes:
                return
            while self._entries and self._bytes + size > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= nbytes(evicted)
                self.evictions += 1
            self._entries[key] = arrays
            self._bytes += size

    def usage(self) -> tuple[int, int]:
        """``(entries, bytes)``."""
        with self._lock:
            return len(self._entries), self._bytes

    def __len__(self) -> int:
        return len(self._entries)


# KEYS[1]: the entry, KEYS[2]: the index. ARGV: ttl, now, most entries, then field, value pairs.
_PUT = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[1]))
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if over > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #popped, 2 do redis.call('DEL', popped[i]) end
end
return over
"""


class SharedEncodings:
    """The shared tier: entries in Redis, read by every worker (see the module docstring).

    An entry is a hash: ``names`` (comma-separated) and, per array, ``<name>:data``,
    ``<name>:dtype``, ``<name>:shape``. The bound counts entries: the budget
    over the size of the entry being written.
    """

    def __init__(self, client: redis.Redis, budget_mb: float, ttl_s: int, half: bool = True) -> None:
        self.redis = client
        self.budget_bytes = int(budget_mb * 2**20)
        self.ttl_s = int(ttl_s)
        self.half = half
        self._put = client.register_script(_PUT)

    @staticmethod
    def _key(key: EncodingKey) -> str:
        return keys.encoding(key.part, key.tenant or "", key.input)

    def get(self, key: EncodingKey) -> Arrays | None:
        import redis

        name = self._key(key)
        try:
            with self.redis.pipeline() as pipe:
                pipe.hgetall(name)
                pipe.zadd(keys.ENCODINGS, {name: time.time()}, xx=True)  # used now: last to be evicted
                pipe.expire(name, self.ttl_s)
                fields, *_ = pipe.execute()
        except redis.RedisError as exc:
            log.info("shared encodings: cannot read (%s); the encoder runs", exc)
            return None
        if not fields or b"names" not in fields:
            return None
        arrays = {}
        for array_name in fields[b"names"].decode().split(","):
            data, dtype, shape = (fields[f"{array_name}:{what}".encode()] for what in ("data", "dtype", "shape"))
            array = np.frombuffer(data, dtype=dtype.decode()).reshape(
                tuple(int(v) for v in shape.decode().split(",") if v)
            )
            arrays[array_name] = array.astype(np.float32) if array.dtype == np.float16 else array.copy()
        return arrays

    def put(self, key: EncodingKey, arrays: Arrays) -> bool:
        import redis

        stored = {
            name: a.astype(np.float16 if self.half else np.float32) if np.issubdtype(a.dtype, np.floating) else a
            for name, a in arrays.items()
        }
        most = self.budget_bytes // max(nbytes(stored), 1)
        if most < 1:
            return False
        pairs: list[Any] = ["names", ",".join(stored)]
        for name, array in stored.items():
            pairs += [
                f"{name}:data",
                np.ascontiguousarray(array).tobytes(),
                f"{name}:dtype",
                str(array.dtype),
                f"{name}:shape",
                ",".join(map(str, array.shape)),
            ]
        try:
            self._put(keys=[self._key(key), keys.ENCODINGS], args=[self.ttl_s, time.time(), most, *pairs])
        except redis.RedisError as exc:
            log.info("shared encodings: cannot write (%s); only this process keeps it", exc)
            return False
        return True


class EncoderCache:
    """This process's encodings of every model part, in front of the shared tier (when there is one)."""

    def __init__(self, shared: SharedEncodings | None = None):
        self.shared = shared
        self._parts: dict[str, LocalEncodings] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis | None = None) -> EncoderCache:
        """The worker's cache: the shared tier in ``client``'s Redis unless ``MASKQ_SHARED_EMBEDDINGS_MB`` is 0."""
        if client is None or settings.shared_embeddings_mb <= 0:
            return cls()
        return cls(
            SharedEncodings(
                client,
                settings.shared_embeddings_mb,
                settings.shared_embeddings_ttl_s,
                half=settings.shared_embeddings_fp16,
            )
        )

    def part(self, part: str, budget_bytes: int) -> EncoderPart:
        """A model's view of one encoder part's entries, keeping up to ``budget_bytes`` of them here.

        Models that share the part share its entries, within the largest budget any of them asked for.
        A budget of 0 keeps nothing in this process for that model (the shared tier still serves it).
        """
        with self._lock:
            local = self._parts.get(part)
            if local is None:
                local = self._parts[part] = LocalEncodings(budget_bytes)
            elif budget_bytes > local.budget_bytes:
                local.budget_bytes = int(budget_bytes)
        return EncoderPart(self, part, local, use_local=budget_bytes > 0)


class EncoderPart:
    """One model's view of one encoder part: look up, store, and count for that model."""

    def __init__(self, cache: EncoderCache, part: str, local: LocalEncodings, use_local: bool = True):
        self.cache = cache
        self.part = part
        self.local = local
        self.use_local = use_local
        self._stats = CacheStats()
        self._lock = threading.Lock()

    def key(self, tenant: str | None, input_hash: str) -> EncodingKey:
        return EncodingKey(self.part, tenant, input_hash)

    def lookup(self, key: EncodingKey, share: bool) -> tuple[Arrays | None, EncodingSource | None]:
        """The entry and where it came from (this process, else the shared tier when ``share``), or ``(None, None)``.

        ``share``: the input has a content hash and a tenant, so other workers may hold it too.
        """
        arrays = self.local.get((key.tenant, key.input)) if self.use_local else None
        with self._lock:
            if arrays is None:
                self._stats.misses += 1
            else:
                self._stats.hits += 1
        if arrays is not None:
            return arrays, EncodingSource.LOCAL
        if share and self.cache.shared is not None:
            arrays = self.cache.shared.get(key)
            if arrays is not None:
                self._keep(key, arrays)
                return arrays, EncodingSource.SHARED
        return None, None

    def store(self, key: EncodingKey, arrays: Arrays, share: bool) -> None:
        """Keep what the encoder just made, here and (when ``share``) in the shared tier."""
        with self._lock:
            self._stats.encoder_runs += 1
        self._keep(key, arrays)
        if share and self.cache.shared is not None:
            self.cache.shared.put(key, arrays)

    def _keep(self, key: EncodingKey, arrays: Arrays) -> None:
        if self.use_local:
            self.local.put((key.tenant, key.input), arrays)
        else:
            for array in arrays.values():
                array.flags.writeable = False

    def stats(self) -> dict[str, int]:
        entries, size = self.local.usage() if self.use_local else (0, 0)
        with self._lock:
            self._stats.evictions = self.local.evictions if self.use_local else 0
            self._stats.entries, self._stats.bytes = entries, size
            self._stats.budget_bytes = self.local.budget_bytes if self.use_local else 0
            return asdict(self._stats)
