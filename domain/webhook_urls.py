"""The guard against server-side request forgery through webhook URLs.

A webhook URL is a request the service makes on a client's behalf, from
inside the operator's network. Unless the operator allows a network
(``webhook_allowed_networks``), a URL may only lead to public addresses: no
loopback, private, link-local (cloud metadata at 169.254.169.254 among them),
shared (CGNAT), multicast, reserved or unspecified ones. The check runs at
submit (a 422 naming ``webhook.url``) and again on every delivery, where the
connection is made to the very address that was checked, so a DNS answer that
changes in between (DNS rebinding) cannot redirect it. The submit-time check
never resolves a name (a client's name server must not hold a web thread):
it judges addresses and ``localhost`` names, and leaves other names to the
delivery, which refuses them for good if they lead somewhere forbidden.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
from functools import lru_cache
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from domain.errors import ValidationFailed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ForbiddenAddress(Exception):
    """A webhook host resolves to an address that the service must not call; retrying cannot help.

    Not an ``OSError`` on purpose: urllib3 would take it for a network error and retry it.
    """


class Unresolvable(OSError):
    """A webhook host has no address (now): a network error like any other."""


NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))  # RFC 6052, RFC 8215
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # ::a.b.c.d (deprecated by RFC 4291, still routed by some stacks)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to, if it carries one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in network for network in NAT64) or (ip in IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class WebhookGuard:
    """Decides which addresses a webhook may reach; ``allowed`` lists the CIDR networks let through anyway."""

    def __init__(self, allowed: tuple[str, ...] = ()):
        self.allowed = tuple(ipaddress.ip_network(n, strict=False) for n in allowed)

    def permits(self, ip: IPAddress) -> bool:
        if any(ip in network for network in self.allowed):
            return True
        # An IPv6 address that carries an IPv4 one (mapped, NAT64, 6to4, Teredo, IPv4-compatible)
        # reaches that IPv4 address: it is judged as that address too.
        embedded = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
        if embedded is not None and not self.permits(embedded):
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return True  # the mapped IPv4 address passed just now
        return ip.is_global and not ip.is_multicast

    def resolve(self, host: str, port: int) -> list[str]:
        """Every address ``host`` resolves to, if all are permitted; else :class:`ForbiddenAddress`.

        All of them, not only the first: a name with one public and one
        private address would otherwise reach the private one on a retry.
        """
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError, ValueError) as exc:  # ValueError: a NUL in the name
            raise Unresolvable(f"cannot resolve {host}: {exc}") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        for address in addresses:
            if not self.permits(ipaddress.ip_address(address.split("%", 1)[0])):
                raise ForbiddenAddress(
                    f"{host} resolves to {address}, a loopback, private, link-local or otherwise non-public "
                    "address; webhooks may only call public addresses (an operator can allow a network with "
                    "MASKQ_WEBHOOK_ALLOWED_NETWORKS)"
                )
        if not addresses:
            raise Unresolvable(f"{host} has no address")
        return addresses

    def check_url(self, url: str) -> None:
        """Raise :class:`ValidationFailed` (422, field ``webhook.url``) unless ``url`` may be called."""
        def refuse(message: str):
            raise ValidationFailed(f"webhook.url: {message}", errors=[{"field": "webhook.url", "message": message}])

        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            refuse(f"is not a valid URL: {exc}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            refuse("must be an absolute http:// or https:// URL")
        # No DNS lookup here: the name is the client's, and a slow or hostile name server would hold
        # a web thread. An address, and the names that are loopback by definition, are judged now;
        # any other name is resolved and checked at every delivery attempt (a refusal ends it for good).
        host = parts.hostname.rstrip(".").lower()
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            if host == "localhost" or host.endswith(".localhost"):  # RFC 6761
                address = ipaddress.ip_address("127.0.0.1")
            else:
                return
        if not self.permits(address):
            refuse(f"{parts.hostname} is a loopback, private, link-local or otherwise non-public address; "
                   "webhooks may only call public addresses (an operator can allow a network with "
                   "MASKQ_WEBHOOK_ALLOWED_NETWORKS)")

    def session(self, deadline: Deadline | None = None) -> requests.Session:
        """A ``requests`` session that only connects to addresses this guard permits (within ``deadline``)."""
        session = requests.Session()
        session.trust_env = False  # no proxy from the environment: the guard must see the real peer
        adapter = _GuardedAdapter(self, deadline)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session


@lru_cache(maxsize=8)
def guard_for(allowed: tuple[str, ...]) -> WebhookGuard:
    return WebhookGuard(allowed)


def check_webhook_url(url: str, allowed: tuple[str, ...] = ()) -> None:
    """The submit-time check: a 422 naming ``webhook.url`` for a URL the service must not call."""
    guard_for(tuple(allowed)).check_url(url)


class Deadline:
    """A whole request's time limit: once it is up, the request's sockets are shut down.

    Socket timeouts bound each read, not the request: a receiver that
    trickles its answer a byte at a time would hold a worker for ever. Use
    as a context manager around the request, with :meth:`WebhookGuard.session`.
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

    def __enter__(self) -> "Deadline":
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
        http = type("GuardedHTTPPool", (HTTPConnectionPool,),
                    {"ConnectionCls": _guarded_connection(HTTPConnection, self.guard, self.deadline)})
        https = type("GuardedHTTPSPool", (HTTPSConnectionPool,),
                     {"ConnectionCls": _guarded_connection(HTTPSConnection, self.guard, self.deadline)})
        self.poolmanager.pool_classes_by_scheme = {"http": http, "https": https}
