"""``Idempotency-Key`` on ``POST /v1/jobs``: a client may retry a submit without making a second job.

The same key with the same body (the image's bytes and the request JSON,
whether sent as multipart or inline) within ``MASKQ_IDEMPOTENCY_TTL_S``
returns the job the first request made; the same key with another body is a
422. Keys are per tenant. Follows the IETF httpapi Idempotency-Key draft: a
retry that arrives while the first request is still being handled is a 409.

A claim is written before the job is queued and kept for the TTL only when
the answer is a 2xx; a request that fails lets its claim go, and one whose
process dies mid-way leaves a pending claim that lapses after
``MASKQ_IDEMPOTENCY_PENDING_TTL_S`` (a batch's fan-out, which may take longer,
renews it as it goes: :meth:`Claim.keep_alive`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import redis
from flask import after_this_request, request

from domain import keys
from domain.errors import Conflict, InputError, ValidationFailed
from webapp.auth import current_tenant
from webapp.services import services

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
PENDING_TTL_S = 60

# Delete the claim only if it is still the one this request wrote.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Push a pending claim's lapse back, only if it is still the one this request wrote.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def fingerprint(image: bytes, body: object) -> str:
    """What makes two submissions "the same": the image bytes and the request JSON, canonically."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(hashlib.sha256(image).hexdigest().encode() + b"\n" + canonical.encode()).hexdigest()


def check_key(value: str) -> str:
    if not 1 <= len(value) <= MAX_KEY_LENGTH or not value.isprintable() or not value.isascii():
        message = f"must be 1 to {MAX_KEY_LENGTH} printable ASCII characters"
        raise InputError(f"the {HEADER} header {message}", errors=[{"field": HEADER, "message": message}])
    return value


@dataclass
class Claim:
    """One submission's hold on an ``Idempotency-Key`` (or none, without the header).

    ``replayed`` is True when an earlier request with the same key and body
    made ``job_id``; otherwise the new job is ``job_id`` and :meth:`settle`
    keeps or drops the claim once the answer is known.
    """

    job_id: str
    replayed: bool = False
    redis: redis.Redis | None = None
    key: str | None = None
    value: str = ""
    ttl_s: int = 0
    pending_ttl_s: int = PENDING_TTL_S

    def keep_alive(self) -> None:
        """The request is still at work: hold the pending claim another ``pending_ttl_s``."""
        if self.key is None or self.redis is None or self.replayed:
            return
        try:
            self.redis.eval(_RENEW, 1, self.key, self.value, self.pending_ttl_s)
        except redis.RedisError:
            pass  # the next call tries again; at worst the claim lapses, as it would if we had died

    def settle(self, response):
        """Keep the claim for ``ttl_s`` when the job was queued (a 2xx answer), else let it go."""
        if self.key is None or self.redis is None or self.replayed:
            return response
        try:
            if 200 <= response.status_code < 300:
                # The answer names the job (a result-cache hit may name another than the one planned).
                job_id = (response.get_json(silent=True) or {}).get("id") or self.job_id
                done = json.dumps({**json.loads(self.value), "job_id": job_id, "done": True})
                self.redis.set(self.key, done, ex=self.ttl_s)
            else:
                self.redis.eval(_RELEASE, 1, self.key, self.value)
        except redis.RedisError:
            pass  # a pending claim lapses after pending_ttl_s on its own
        return response


def claim(
    client: redis.Redis,
    tenant: str,
    header: str | None,
    job_id: str,
    image: bytes,
    body: object,
    ttl_s: int,
    pending_ttl_s: int = PENDING_TTL_S,
) -> Claim:
    """Claim ``header`` for a new job ``job_id``, or find the job an earlier identical request made.

    Raises ``ValidationFailed`` (422) when the key was used with another body,
    and ``Conflict`` (409) while the request that holds it is still running.
    """
    if header is None:
        return Claim(job_id)
    key = keys.idempotency(tenant, hashlib.sha256(check_key(header).encode()).hexdigest())
    digest = fingerprint(image, body)
    value = json.dumps({"job_id": job_id, "fingerprint": digest, "done": False})
    for _ in range(3):  # the holder may let go between our SET and our GET
        if client.set(key, value, nx=True, ex=pending_ttl_s):
            return Claim(job_id, redis=client, key=key, value=value, ttl_s=ttl_s, pending_ttl_s=pending_ttl_s)
        held = client.get(key)
        if held is not None:
            earlier = json.loads(held)
            if earlier["fingerprint"] != digest:
                message = "was used before with a different request body"
                raise ValidationFailed(
                    f"this {HEADER} {message}; use a new key for a new request",
                    errors=[{"field": HEADER, "message": message}],
                )
            if not earlier["done"]:
                raise Conflict(f"a request with this {HEADER} is still being handled; retry it in a moment")
            return Claim(earlier["job_id"], replayed=True)
    raise Conflict(f"a request with this {HEADER} is still being handled; retry it in a moment")


def claim_submission(job_id: str, image: bytes, body: object) -> Claim:
    """:func:`claim` for the ``POST /v1/jobs`` request being handled, in its tenant."""
    settings = services().settings
    # A claim must not outlive the job it points to.
    ttl_s = min(settings.idempotency_ttl_s, settings.job_ttl_s)
    held = claim(
        services().redis,
        current_tenant(),
        request.headers.get(HEADER),
        job_id,
        image,
        body,
        ttl_s,
        settings.idempotency_pending_ttl_s,
    )
    if held.key is not None and not held.replayed:
        after_this_request(held.settle)
    return held
