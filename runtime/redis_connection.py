"""The one way maskq connects to Redis: a ``redis://`` / ``rediss://`` URL, or Sentinel for failover.

``MASKQ_REDIS_URL=sentinel://[:password@]host:port[;sentinel://host:port…][/db]`` (kombu's form, so
Celery reads the same URL) with ``MASKQ_REDIS_SENTINEL_MASTER`` (``mymaster``) names the Sentinels
to ask; every client (records, lanes, heartbeats, rate limits, Celery's broker) then talks to the
primary they name, and finds the new one after a failover. The password is the primary's; the
Sentinels are asked without one. The Lua scripts need one primary: Sentinel, not Redis Cluster.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from config.settings import Settings, is_sentinel


class ReplicasLost(redis.ConnectionError):
    """The primary refused a write because it has lost its replicas (``NOREPLICAS``, ``min-replicas-to-write``).

    A primary cut off from its replicas is one whose writes a failover is about to throw away, or a new
    primary whose replicas have not attached yet: either way the write did not happen and should wait,
    so every client reads it as the connection error it amounts to. redis-py then reconnects (asking the
    Sentinels afresh, so a client of a demoted primary finds the new one), kombu reconnects instead of
    calling it an unrecoverable error, and maskq's own waits (``workers/redis_outage.py``, the web's 503)
    apply. Found by tests/cluster's "Redis primary partitioned" scenario.
    """


def _read_lost_replicas_as_connection_errors() -> None:
    from redis._parsers.base import BaseParser

    BaseParser.EXCEPTION_CLASSES.setdefault("NOREPLICAS", ReplicasLost)


_read_lost_replicas_as_connection_errors()  # once, for every client in this process (kombu's too)


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str | None, int]:
    """``([(host, port), …], password, db)`` of a kombu-style Sentinel URL (pure; unit-tested)."""
    hosts, password, db = [], None, 0
    for part in url.split(";"):
        parsed = urlsplit(part.strip())
        if parsed.scheme != "sentinel" or not parsed.hostname:
            raise ValueError(f"not a sentinel://host:port URL: {part!r}")
        hosts.append((parsed.hostname, parsed.port or 26379))
        password = unquote(parsed.password) if parsed.password else password
        if parsed.path.strip("/"):
            db = int(parsed.path.strip("/"))
    return hosts, password, db


def connect(url: str, master: str = "mymaster", **kwargs) -> redis.Redis:
    """A client of the Redis primary at ``url`` (through Sentinel for a ``sentinel://`` URL)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    hosts, password, db = parse_sentinel_url(url)
    timeouts = {k: v for k, v in kwargs.items() if k in ("socket_timeout", "socket_connect_timeout")}
    return Sentinel(hosts, sentinel_kwargs=timeouts).master_for(master, password=password, db=db, **kwargs)


def service_client(settings: Settings) -> redis.Redis:
    """The Redis client of a web or worker process: every call bounded by ``MASKQ_REDIS_SOCKET_TIMEOUT_S``,
    connecting by 5 s at most, so a Redis cut off by a partition is an error, not a call that hangs."""
    timeout = settings.redis_socket_timeout_s
    return connect(
        settings.broker_url,
        settings.redis_sentinel_master,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 5.0),
    )


def limiter_storage(url: str, master: str = "mymaster") -> tuple[str, dict]:
    """The same server as flask-limiter's storage URI and extra options (``redis+sentinel://`` for Sentinel,
    whose Sentinels are asked without the primary's password, as :func:`connect` asks them)."""
    if not is_sentinel(url):
        return url, {}
    hosts, password, db = parse_sentinel_url(url)
    auth = f":{password}@" if password else ""
    uri = f"redis+sentinel://{auth}{','.join(f'{h}:{p}' for h, p in hosts)}/{master}"
    return uri, {"sentinel_kwargs": {"password": None}, **({"db": db} if db else {})}
