"""Tenants and their API keys: a key's policy and how it is checked (kept in Redis by ``stores/tenants.py``).

A key is shown once, when it is created, and stored only as its SHA-256
hash: ``maskq:apikey:{sha256}`` is a hash with the key's tenant and policy
(default lane, highest lane allowed, rate limit, revoked or not). A key of
32 random bytes needs no slow password hash: nobody can guess one, so a fast
hash only has to make the stored form useless to whoever reads Redis.

A tenant's webhook secret (``whsec_…``) is :func:`stores.webhooks.tenant_secret`,
shared by all of the tenant's keys; ``maskq keys create`` shows it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from limits import parse_many

from config.settings import LANES

KEY_PREFIX = "mq_"
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# Highest first: a key whose ceiling is "default" may use "default" and "batch".
LANE_RANK = {lane: rank for rank, lane in enumerate(reversed(LANES))}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def lane_allowed(lane: str, ceiling: str) -> bool:
    """True when ``lane`` is not above ``ceiling`` (interactive > default > batch)."""
    return LANE_RANK[lane] <= LANE_RANK[ceiling]


def check_policy(tenant: str, lane: str | None, max_lane: str, rate: str | None) -> None:
    """Raise ``ValueError`` with a message fit for the CLI when a key's policy is unusable."""
    if not TENANT_NAME.match(tenant):
        # The tenant names a folder in object storage: keep it to safe characters.
        raise ValueError(f"tenant {tenant!r}: use 1-63 of a-z, 0-9, '.', '_', '-', starting with a letter or digit")
    for name, value in (("lane", lane), ("max lane", max_lane)):
        if value is not None and value not in LANES:
            raise ValueError(f"{name} {value!r}: must be one of {', '.join(LANES)}")
    if lane is not None and not lane_allowed(lane, max_lane):
        raise ValueError(f"the default lane {lane!r} is above the key's highest lane {max_lane!r}")
    if rate is not None:
        check_rate(rate)


def check_rate(rate: str) -> str:
    """A rate limit string as flask-limiter reads it (``600/minute``, ``10 per second``)."""
    try:
        if parse_many(rate):
            return rate
    except ValueError:
        pass
    raise ValueError(f"rate {rate!r}: write it as COUNT/PERIOD, e.g. '600/minute' or '10/second'")


@dataclass(frozen=True)
class ApiKey:
    """One API key as stored: its hash, its tenant and what it may do. Never the key itself."""

    key_hash: str
    tenant: str
    lane: str | None = None  # None: the service's default lane (MASKQ_DEFAULT_LANE)
    max_lane: str = "interactive"
    rate: str | None = None
    label: str = ""
    created_at: float = 0.0
    revoked_at: float | None = None
    admin: bool = False  # may read the service's internals (GET /v1/admin/status)

    @property
    def key_id(self) -> str:
        """A short, public handle for the key (the start of its hash): safe to list and log."""
        return self.key_hash[:12]

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def lane_for(self, asked: str | None, service_default: str) -> str:
        """The lane a job of this key goes to; ``PermissionError`` when ``asked`` is above the ceiling."""
        if asked is not None:
            if not lane_allowed(asked, self.max_lane):
                raise PermissionError(f"this API key may use lanes up to {self.max_lane!r}; {asked!r} is above that")
            return asked
        lane = self.lane or service_default
        # Nothing asked for: the default, lowered to the ceiling rather than refused.
        return lane if lane_allowed(lane, self.max_lane) else self.max_lane

    def to_hash(self) -> dict[str, str]:
        fields = {
            "tenant": self.tenant,
            "lane": self.lane or "",
            "max_lane": self.max_lane,
            "rate": self.rate or "",
            "label": self.label,
            "created_at": repr(self.created_at),
            "admin": "1" if self.admin else "",
        }
        if self.revoked_at is not None:
            fields["revoked_at"] = repr(self.revoked_at)
        return fields

    @classmethod
    def from_hash(cls, key_hash: str, raw: dict[bytes, bytes]) -> ApiKey:
        data = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            key_hash=key_hash,
            tenant=data["tenant"],
            lane=data.get("lane") or None,
            max_lane=data.get("max_lane", "interactive"),
            rate=data.get("rate") or None,
            label=data.get("label", ""),
            created_at=float(data.get("created_at", 0)),
            revoked_at=float(data["revoked_at"]) if data.get("revoked_at") else None,
            admin=data.get("admin") == "1",
        )
