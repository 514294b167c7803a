"""Bearer-key authentication for every ``/v1`` route, and the lane policy of the key.

One ``before_request`` hook on the app, not a decorator per route, so that a
route added later cannot forget it. It puts the key's stored record on
``flask.g.api_key``; views read the tenant with :func:`current_tenant` and
pick a lane with :func:`choose_lane`.
"""

from __future__ import annotations

import math
import time

from flask import Flask, current_app, g, request
from limits import parse
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from domain.errors import Forbidden, TooManyRequests, Unauthorized
from domain.tenants import ApiKey, hash_key
from runtime.redis_connection import limiter_storage
from stores.tenants import KeyStore
from webapp.errors import problem
from webapp.services import services

API_PREFIX = "/v1/"
# With MASKQ_AUTH=off (loopback only) every request is this tenant, with every lane allowed.
LOCAL_TENANT = "default"
# How long a web process trusts a key's record it read from Redis: a revoked key (or a changed policy)
# is refused by each web process at most this long after `maskq keys revoke`. Unknown keys are never kept.
KEY_CACHE_TTL_S = 1.0
KEY_CACHE_MAX = 1024


def init_app(app: Flask) -> None:
    """Register the hook; call it before the rate limiter's, which keys on the authenticated key."""
    app.extensions["maskq.failed_auth"] = FailedAuthentications(app.extensions["maskq"].settings)
    app.extensions["maskq.key_cache"] = KeyCache(KEY_CACHE_TTL_S)
    app.before_request(authenticate)

    @app.errorhandler(Unauthorized)
    def _unauthorized(exc: Unauthorized):
        return problem(exc.status, exc.title, exc.detail, headers={"WWW-Authenticate": 'Bearer realm="maskq"'})


def authenticate() -> None:
    """Put the caller's key on ``g.api_key`` for a ``/v1`` request, or refuse it (401, 403)."""
    if not request.path.startswith(API_PREFIX) or request.method == "OPTIONS":
        return
    s = services()
    if s.settings.auth == "off":
        g.api_key = ApiKey(key_hash="", tenant=LOCAL_TENANT)
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    bearer = scheme.lower() == "bearer" and bool(token)
    record = current_app.extensions["maskq.key_cache"].lookup(KeyStore(s.redis), token) if bearer else None
    if record is None:
        # Only a failed attempt is counted, and only it is refused past the rate: behind an ingress every
        # client has one address, and a valid key must not wait on what someone else sent from it.
        current_app.extensions["maskq.failed_auth"].count(request.remote_addr or "unknown")
        raise Unauthorized(
            "the API key is not valid"
            if bearer
            else "send the API key as `Authorization: Bearer <key>` (`maskq keys create` makes one)"
        )
    if record.revoked:
        raise Forbidden(f"the API key {record.key_id} was revoked")
    g.api_key = record


class KeyCache:
    """Keys' records as this process last read them, each trusted for ``ttl_s`` (0: always read Redis).

    Saves a hit on the result cache one of its few Redis round trips. Only known keys are kept (an
    unknown one is read, and counted as a failure, every time), at most ``KEY_CACHE_MAX`` of them.
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._records: dict[str, tuple[float, ApiKey]] = {}

    def lookup(self, store: KeyStore, token: str) -> ApiKey | None:
        key_hash = hash_key(token)  # kept by its hash, as Redis keeps it: never the key itself
        now = time.monotonic()
        held = self._records.get(key_hash)
        if held is not None and held[0] > now:
            return held[1]
        record = store.get(key_hash)
        if record is not None and self.ttl_s > 0:
            if len(self._records) >= KEY_CACHE_MAX:
                self._records = {t: h for t, h in self._records.items() if h[0] > now}
                if len(self._records) >= KEY_CACHE_MAX:
                    self._records.clear()
            self._records[key_hash] = (now + self.ttl_s, record)
        elif record is None:
            self._records.pop(key_hash, None)
        return record


class FailedAuthentications:
    """Counts failed authentications per client address (``MASKQ_FAILED_AUTH_RATE``), shared by every web process.

    Past the rate, a failing attempt from the address is a 429 with ``Retry-After`` instead of a 401
    until the window passes: guessing keys costs time, not only requests. A valid key is looked up
    first and never counted or refused here (its own rate limit is ``webapp/limits.py``'s); a key is
    40+ random characters, so letting a right guess through does not make guessing worth it.
    """

    def __init__(self, settings):
        self.rate = parse(settings.failed_auth_rate)
        uri, options = limiter_storage(settings.broker_url, settings.redis_sentinel_master)
        self.limiter = FixedWindowRateLimiter(storage_from_string(uri, socket_timeout=5, **options))

    def count(self, address: str) -> None:
        """Count one failed attempt from ``address``; past the rate, refuse it (429) rather than answer 401."""
        if not self.limiter.hit(self.rate, "maskq-auth-failures", address):
            reset, _ = self.limiter.get_window_stats(self.rate, "maskq-auth-failures", address)
            raise TooManyRequests(
                f"too many failed authentications from this address (over {self.rate}); "
                "retry after the time in Retry-After",
                retry_after=max(1, math.ceil(reset - time.time())),
            )


def current_key() -> ApiKey:
    return g.api_key


def current_tenant() -> str:
    """The tenant of the request's key: every job, file and cache entry a view touches is scoped by it."""
    return g.api_key.tenant


def choose_lane(asked: str | None) -> str:
    """The lane for a new job: the one asked for if the key allows it (else 403), or the key's default."""
    try:
        return current_key().lane_for(asked, services().settings.default_lane)
    except PermissionError as exc:
        raise Forbidden(str(exc), errors=[{"field": "lane", "message": str(exc)}]) from None
