"""Image embeddings shared by every worker process and host, in Redis: a second click runs no encoder.

A SAM-family model spends almost all of a first prompt's time in its image
encoder; a second prompt on the same image needs only the decoder, if the
embedding is at hand. A process's own memory helps only when the next job
lands on the same process; this store helps any worker that takes it.

Entries are keyed by model, version, tenant and the image's SHA-256 (a tenant
never reads another's), stored as float16 (half the bytes; masks from them
match float32 ones, see docs/benchmarks.md) with a TTL, and bounded in MB:
past the bound the least recently used go (one Lua script, so concurrent
writers agree). A store that fails (Redis away) is a miss, never an error:
the encoder runs instead.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import redis

from domain import keys

log = logging.getLogger(__name__)

# KEYS[1]: the entry, KEYS[2]: the index. ARGV: data, dtype, shape, ttl, now, most entries.
_PUT = """
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'dtype', ARGV[2], 'shape', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[5], KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[5]) - tonumber(ARGV[4]))
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[6])
if over > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #popped, 2 do redis.call('DEL', popped[i]) end
end
return over
"""


class SharedEmbeddings:
    """Get and put embeddings by ``(model, version, tenant, image sha256)``; see the module docstring."""

    def __init__(self, client: redis.Redis, budget_mb: float, ttl_s: int, half: bool = True):
        self.redis = client
        self.budget_bytes = int(budget_mb * 2**20)
        self.ttl_s = int(ttl_s)
        self.half = half
        self._put = client.register_script(_PUT)

    def get(self, model: str, version: str, tenant: str, image_sha256: str) -> np.ndarray | None:
        key = keys.embedding(model, version, tenant, image_sha256)
        try:
            with self.redis.pipeline() as pipe:
                pipe.hmget(key, "data", "dtype", "shape")
                pipe.zadd(keys.EMBEDDINGS, {key: time.time()}, xx=True)  # used now: last to be evicted
                pipe.expire(key, self.ttl_s)
                (data, dtype, shape), *_ = pipe.execute()
        except redis.RedisError as exc:
            log.info("shared embeddings: cannot read (%s); the encoder runs", exc)
            return None
        if data is None:
            return None
        array = np.frombuffer(data, dtype=dtype.decode()).reshape(tuple(int(v) for v in shape.decode().split(",")))
        return array.astype(np.float32)

    def put(self, model: str, version: str, tenant: str, image_sha256: str, embedding: np.ndarray) -> bool:
        stored = embedding.astype(np.float16 if self.half else np.float32)
        most = self.budget_bytes // max(stored.nbytes, 1)
        if most < 1:
            return False
        key = keys.embedding(model, version, tenant, image_sha256)
        try:
            self._put(keys=[key, keys.EMBEDDINGS],
                      args=[stored.tobytes(), str(stored.dtype), ",".join(map(str, stored.shape)), self.ttl_s,
                            time.time(), most])
        except redis.RedisError as exc:
            log.info("shared embeddings: cannot write (%s); only this process keeps it", exc)
            return False
        return True
