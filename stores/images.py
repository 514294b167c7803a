"""Images stored ahead of their jobs (``POST /v1/images``), kept in Redis, and their encode-only task's message.

A record per tenant and image (``domain/image_records.py``), with a TTL of the
retention period, renewed by every use: an upload of the same bytes, and every
job that names the image. Beside it an index of every image by its last use
(``maskq:images:used``) that outlives the records, so retention
(``workers/retention.py``) deletes the image's file ``retention_s`` after its
last use, as it deletes a job's input ``retention_s`` after the job.
"""

from __future__ import annotations

import time
from typing import Any, cast

import redis

from config.task_names import WARM_IMAGE
from domain import keys
from domain.image_records import Encoding, ImageRecord

# KEYS[1]: the record. ARGV: field, value pairs ('' deletes the field). Changes the record only while it
# exists: a late encode must not bring back a record retention deleted.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""
# KEYS[1]: the record, KEYS[2]: the index. ARGV: the member, the cutoff. Forgets the image unless it was
# used after the cutoff (a job named it while the sweep ran).
_FORGET = """
local used = redis.call('ZSCORE', KEYS[2], ARGV[1])
if used and tonumber(used) > tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


class ImageStore:
    """The tenants' stored images: records by ``(tenant, image id)``, and retention's index of them."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = max(int(ttl_s), 1)
        self._update = client.register_script(_UPDATE)
        self._forget = client.register_script(_FORGET)

    @staticmethod
    def member(tenant: str, image_id: str) -> str:
        """The image in retention's index."""
        return f"{tenant}/{image_id}"

    def get(self, tenant: str, image_id: str) -> ImageRecord | None:
        raw = cast("dict[bytes, bytes]", self.redis.hgetall(keys.image(tenant, image_id)))
        return ImageRecord.from_hash(raw) if raw else None

    def save(self, record: ImageRecord) -> None:
        """Write the whole record (a new image, or one uploaded again), used now."""
        name = keys.image(record.tenant, record.id)
        with self.redis.pipeline() as pipe:  # MULTI: the record and its index move together
            pipe.delete(name)
            pipe.hset(name, mapping=record.to_hash())  # type: ignore[arg-type]  # redis-py's mapping type is too narrow
            pipe.expire(name, self.ttl_s)
            pipe.zadd(keys.IMAGES_USED, {self.member(record.tenant, record.id): record.used_at})
            pipe.execute()

    def touch(self, tenant: str, image_id: str, now: float | None = None) -> None:
        """The image was used now (a job names it): its retention starts again."""
        now = time.time() if now is None else now
        with self.redis.pipeline() as pipe:
            pipe.expire(keys.image(tenant, image_id), self.ttl_s)
            pipe.zadd(keys.IMAGES_USED, {self.member(tenant, image_id): now}, xx=True)
            pipe.execute()
        self._update(keys=[keys.image(tenant, image_id)], args=["used_at", repr(now)])

    def set_encoding(
        self,
        tenant: str,
        image_id: str,
        state: Encoding,
        *,
        encoding_key: str | None = None,
        encode_s: float | None = None,
        error: str | None = None,
    ) -> bool:
        """Record where the image's embedding stands; False when the record is gone (expired, deleted)."""
        values = {
            "encoding": str(state),
            "encoded_at": repr(time.time()) if state == Encoding.READY else "",
            "encoding_key": encoding_key or "",
            "encode_s": "" if encode_s is None else repr(round(encode_s, 4)),
            "error": error or "",
        }
        pairs = [item for pair in values.items() for item in pair]
        return bool(self._update(keys=[keys.image(tenant, image_id)], args=pairs))

    def still_cached(self, record: ImageRecord) -> bool:
        """Whether the shared encoder cache still holds the embedding the worker wrote (True when it kept none
        there: then nothing can be read about it)."""
        if record.encoding_key is None:
            return True
        return bool(self.redis.exists(record.encoding_key))

    def used_before(self, cutoff: float, count: int) -> list[tuple[str, str]]:
        """Up to ``count`` images last used before ``cutoff``: ``(tenant, image id)``, oldest first."""
        members = cast("list[bytes]", self.redis.zrangebyscore(keys.IMAGES_USED, "-inf", cutoff, start=0, num=count))
        return [cast("tuple[str, str]", tuple(m.decode().rsplit("/", 1))) for m in members]

    def forget(self, tenant: str, image_id: str, cutoff: float) -> bool:
        """Drop the record and its index entry, unless the image was used again after ``cutoff`` (then keep it)."""
        member = self.member(tenant, image_id)
        return bool(self._forget(keys=[keys.image(tenant, image_id), keys.IMAGES_USED], args=[member, cutoff]))

    def adopt(self, members: list[str], now: float) -> int:
        """Index images found in storage that the index lacks (``tenant/image id``), as used ``now``."""
        if not members:
            return 0
        return int(cast(int, self.redis.zadd(keys.IMAGES_USED, dict.fromkeys(members, now), nx=True)))


def send_warm(celery: Any, tenant: str, image_id: str, model: str, lane: str, time_limits: tuple[float, float]) -> None:
    """Queue the encode-only task for a stored image on ``lane`` (``tasks/warm_image.py``)."""
    soft, hard = time_limits
    celery.send_task(WARM_IMAGE, args=[tenant, image_id, model], queue=lane, soft_time_limit=soft, time_limit=hard)
