"""Where API keys are kept: each key's hash in Redis (``maskq:apikey:{sha256}``) with its tenant and policy.

What a key is and what it may do is ``domain/tenants.py``; a key is never
stored, only its SHA-256 hash.
"""

from __future__ import annotations

import re
import time
from typing import cast

import redis

from domain import keys
from domain.tenants import KEY_PREFIX, ApiKey, check_policy, hash_key, new_key


class KeyStore:
    """Creates, finds, lists and revokes API keys."""

    INDEX = keys.API_KEYS

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    key = staticmethod(keys.api_key)

    def create(
        self,
        tenant: str,
        *,
        lane: str | None = None,
        max_lane: str = "interactive",
        rate: str | None = None,
        label: str = "",
        admin: bool = False,
    ) -> tuple[str, ApiKey]:
        """A new key for ``tenant``: ``(the key, as shown once, its stored record)``."""
        key = new_key()
        return key, self.add(key, tenant, lane=lane, max_lane=max_lane, rate=rate, label=label, admin=admin)

    def add(
        self,
        key: str,
        tenant: str,
        *,
        lane: str | None = None,
        max_lane: str = "interactive",
        rate: str | None = None,
        label: str = "",
        admin: bool = False,
    ) -> ApiKey:
        """Store the hash of a key made elsewhere (the development key); ``create`` is the usual way."""
        check_policy(tenant, lane, max_lane, rate)
        record = ApiKey(
            key_hash=hash_key(key),
            tenant=tenant,
            lane=lane,
            max_lane=max_lane,
            rate=rate,
            label=label,
            created_at=time.time(),
            admin=admin,
        )
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key(record.key_hash), mapping=record.to_hash())  # type: ignore[arg-type]  # (redis-py: str keys)
            pipe.zadd(self.INDEX, {record.key_hash: record.created_at})
            pipe.execute()
        return record

    def lookup(self, key: str) -> ApiKey | None:
        """The stored record of a presented key (revoked ones too), or None for an unknown key."""
        return self.get(hash_key(key))

    def get(self, key_hash: str) -> ApiKey | None:
        raw = cast("dict[bytes, bytes]", self.redis.hgetall(self.key(key_hash)))  # (clients here answer bytes)
        return ApiKey.from_hash(key_hash, raw) if raw else None

    def list(self, tenant: str | None = None) -> list[ApiKey]:
        records = [self.get(h.decode()) for h in cast("list[bytes]", self.redis.zrange(self.INDEX, 0, -1))]
        return [r for r in records if r is not None and (tenant is None or r.tenant == tenant)]

    def find(self, key_or_id: str) -> ApiKey:
        """A key by the key itself or by its id (or a unique start of the id, 8 characters at least)."""
        if key_or_id.startswith(KEY_PREFIX):
            found = self.lookup(key_or_id)
            if found is None:
                raise LookupError("no such key")
            return found
        if len(key_or_id) < 8 or not re.fullmatch(r"[0-9a-f]+", key_or_id):
            raise LookupError("give the key itself or its id (8 or more hex characters, as `maskq keys list` shows)")
        matches = [r for r in self.list() if r.key_hash.startswith(key_or_id)]
        if not matches:
            raise LookupError("no such key id")
        if len(matches) > 1:
            raise LookupError(f"{len(matches)} keys start with {key_or_id}; give more of the id")
        return matches[0]

    def revoke(self, key_or_id: str) -> ApiKey:
        """Mark a key revoked (it then answers 403); the record stays so the refusal can say why."""
        record = self.find(key_or_id)
        if not record.revoked:
            self.redis.hset(self.key(record.key_hash), "revoked_at", repr(time.time()))
        return self.get(record.key_hash) or record
