"""Rate limits: flask-limiter counting in the service's Redis, so every web process shares the counts.

Three application-wide limits, each across all routes together:

- per API key: the key's own rate (``maskq keys create --rate``) or ``MASKQ_DEFAULT_RATE``;
- for every key together: ``MASKQ_GLOBAL_RATE``;
- requests that no key vouches for (the page, the docs, the OpenAPI document, 404s) count per client
  address in a bucket of their own, ``MASKQ_ANONYMOUS_RATE``, and spend neither of the two above: a
  client that fetches ``/openapi.json`` in a loop cannot use up the service's rate for the keys.

The client address is the peer's, or with ``MASKQ_TRUSTED_PROXY_HOPS`` the one that many proxies
back in ``X-Forwarded-For`` (``webapp/app.py``).

Every limited response carries ``X-RateLimit-Limit``, ``-Remaining`` and ``-Reset``; a refusal
is a 429 problem with ``Retry-After``. Health probes and metrics are never limited: an
orchestrator that cannot probe a busy service would restart it.
"""

from __future__ import annotations

import math
import time

from flask import Flask, Response, current_app, g, request
from flask_limiter import ApplicationLimit, HeaderNames, Limiter, RateLimitExceeded

from config.settings import Settings
from runtime.redis_connection import limiter_storage
from webapp.errors import problem
from webapp.services import services

UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# flask-limiter writes Retry-After on every response it counts, and folds an existing one (a 503's)
# into its own reset time; it writes under this name instead, and the hook below keeps what is right.
LIMITER_RETRY_AFTER = "X-Maskq-Limiter-Retry-After"


# An unmatched path (a 404) has no endpoint, and flask-limiter leaves such a request unlimited: it is
# identified by this name instead, so it counts in the anonymous bucket like the other anonymous routes.
UNMATCHED = "maskq-unmatched"


def client_id() -> str:
    """Whom a request counts against: its API key's hash, or its address when it has no key."""
    key = g.get("api_key")
    if key is not None and key.key_hash:
        return "key:" + key.key_hash
    return "addr:" + (request.remote_addr or "unknown")


def anonymous() -> bool:
    """True for a request no key vouches for: outside ``/v1``, or a preflight (``MASKQ_AUTH=off`` vouches for /v1)."""
    return g.get("api_key") is None


def key_rate() -> str:
    key = g.get("api_key")
    return (key.rate if key is not None else None) or services().settings.default_rate


def init_app(app: Flask, settings: Settings) -> Limiter:
    """Install the limiter; call it after :func:`webapp.auth.init_app` (the limits key on the key)."""
    # Flask runs after_request hooks last-registered first: registered before the limiter's own,
    # this one sees the headers the limiter has written.
    app.after_request(_retry_after)
    storage_uri, storage_options = limiter_storage(settings.broker_url, settings.redis_sentinel_master)
    limiter = Limiter(
        client_id,
        application_limits=[
            ApplicationLimit(key_rate, scope="key", exempt_when=anonymous),
            ApplicationLimit(
                settings.global_rate, key_function=lambda: "everyone", scope="global", exempt_when=anonymous
            ),
            ApplicationLimit(settings.anonymous_rate, scope="anonymous", exempt_when=lambda: not anonymous()),
        ],
        request_identifier=lambda: request.endpoint or UNMATCHED,
        storage_uri=storage_uri,
        storage_options={"socket_timeout": 5, "socket_connect_timeout": 5, **storage_options},
        strategy=settings.rate_limit_strategy,
        headers_enabled=True,
        # Redis down: count in each process's memory instead (and go back once it answers), so the
        # routes that need no Redis (the docs) keep working; the /v1 routes answer 503 on their own.
        in_memory_fallback_enabled=True,
        header_name_mapping={HeaderNames.RETRY_AFTER: LIMITER_RETRY_AFTER},
        key_prefix="maskq",
    )
    limiter.request_filter(lambda: request.path in UNLIMITED_PATHS)
    limiter.init_app(app)
    app.register_error_handler(RateLimitExceeded, _too_many_requests)
    app.extensions["maskq.limiter"] = limiter
    return limiter


def _too_many_requests(exc: RateLimitExceeded) -> Response:
    rate = exc.limit.limit
    if exc.limit.scope == "global":
        detail = f"the service is over its overall rate limit of {rate}; retry after the time in Retry-After"
    elif exc.limit.scope == "anonymous":
        detail = (
            f"requests without an API key from this address are over their rate limit of {rate}; "
            "retry after the time in Retry-After"
        )
    else:
        detail = f"this client is over its rate limit of {rate}; retry after the time in Retry-After"
    return problem(429, "Too many requests", detail)


def _retry_after(response: Response) -> Response:
    response.headers.pop(LIMITER_RETRY_AFTER, None)
    if response.status_code == 429:
        limiter = current_app.extensions.get("maskq.limiter")
        current = limiter.current_limit if limiter is not None else None
        wait = math.ceil(current.reset_at - time.time()) if current is not None else 1
        response.headers["Retry-After"] = str(max(1, wait))
    return response
