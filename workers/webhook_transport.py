"""The webhook's HTTP transport: a ``requests`` session that only reaches what the guard permits, in time.

The guard's rules (which addresses a webhook may reach, the submit-time URL
check) are the domain's, shared with the web (``domain/webhook_urls.py``); this
is the part that connects, used by the delivery beside it
(``workers/webhook_delivery.py``). Each connection resolves the host once,
checks every address it resolves to (:meth:`WebhookGuard.resolve`) and connects
to the very address checked, so a DNS answer that changes between the check and
the connection (DNS rebinding) cannot redirect it; the Host header and the TLS
server name keep the URL's host name. No proxy from the environment, no
retries, and one :class:`Deadline` for the whole attempt.
"""

from __future__ import annotations

import socket
import threading

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from domain.webhook_urls import WebhookGuard


def guarded_session(guard: WebhookGuard, deadline: Deadline | None = None) -> requests.Session:
    """A ``requests`` session that only connects to addresses ``guard`` permits (within ``deadline``)."""
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment: the guard must see the real peer
    adapter = _GuardedAdapter(guard, deadline)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class Deadline:
    """A whole request's time limit: once it is up, the request's sockets are shut down.

    Socket timeouts bound each read, not the request: a receiver that
    trickles its answer a byte at a time would hold a worker for ever. Use
    as a context manager around the request, with :func:`guarded_session`.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv, unlike close()
    except OSError:
        pass


def _guarded_connection(base: type, guard: WebhookGuard, deadline: Deadline | None) -> type:
    class GuardedConnection(base):
        _dns_host: str  # urllib3's: the name it resolves and connects to

        def _new_conn(self):
            # Resolve once, check every answer, and connect to the checked address; the Host
            # header and the TLS server name keep the original host name.
            host = self._dns_host
            address = guard.resolve(host.rstrip("."), self.port)[0]
            self._dns_host = address
            try:
                sock = super()._new_conn()
            finally:
                self._dns_host = host
            if deadline is not None:
                deadline.watch(sock)
            return sock

    return GuardedConnection


class _GuardedAdapter(HTTPAdapter):
    def __init__(self, guard: WebhookGuard, deadline: Deadline | None = None):
        self.guard = guard
        self.deadline = deadline
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        http = type(
            "GuardedHTTPPool",
            (HTTPConnectionPool,),
            {"ConnectionCls": _guarded_connection(HTTPConnection, self.guard, self.deadline)},
        )
        https = type(
            "GuardedHTTPSPool",
            (HTTPSConnectionPool,),
            {"ConnectionCls": _guarded_connection(HTTPSConnection, self.guard, self.deadline)},
        )
        self.poolmanager.pool_classes_by_scheme = {"http": http, "https": https}
