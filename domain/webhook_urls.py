"""The guard against server-side request forgery through webhook URLs.

A webhook URL is a request the service makes on a client's behalf, from
inside the operator's network. Unless the operator allows a network
(``webhook_allowed_networks``), a URL may only lead to public addresses: no
loopback, private, link-local (cloud metadata at 169.254.169.254 among them),
shared (CGNAT), multicast, reserved or unspecified ones. The check runs at
submit (a 422 naming ``webhook.url``) and again on every delivery, where the
connection is made to the very address that was checked, so a DNS answer that
changes in between (DNS rebinding) cannot redirect it.
"""
from __future__ import annotations

import ipaddress
import socket
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


class WebhookGuard:
    """Decides which addresses a webhook may reach; ``allowed`` lists the CIDR networks let through anyway."""

    def __init__(self, allowed: tuple[str, ...] = ()):
        self.allowed = tuple(ipaddress.ip_network(n, strict=False) for n in allowed)

    def permits(self, ip: IPAddress) -> bool:
        # An IPv4-mapped IPv6 address (::ffff:10.0.0.1) is judged as the IPv4 address it carries.
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.allowed):
            return True
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
        try:
            self.resolve(parts.hostname, port)
        except (ForbiddenAddress, Unresolvable) as exc:
            refuse(str(exc))

    def session(self) -> requests.Session:
        """A ``requests`` session that only connects to addresses this guard permits."""
        session = requests.Session()
        session.trust_env = False  # no proxy from the environment: the guard must see the real peer
        adapter = _GuardedAdapter(self)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session


@lru_cache(maxsize=8)
def guard_for(allowed: tuple[str, ...]) -> WebhookGuard:
    return WebhookGuard(allowed)


def check_webhook_url(url: str, allowed: tuple[str, ...] = ()) -> None:
    """The submit-time check: a 422 naming ``webhook.url`` for a URL the service must not call."""
    guard_for(tuple(allowed)).check_url(url)


def _guarded_connection(base: type, guard: WebhookGuard) -> type:
    class GuardedConnection(base):
        def _new_conn(self):
            # Resolve once, check every answer, and connect to the checked address; the Host
            # header and the TLS server name keep the original host name.
            host = self._dns_host
            address = guard.resolve(host.rstrip("."), self.port)[0]
            self._dns_host = address
            try:
                return super()._new_conn()
            finally:
                self._dns_host = host

    return GuardedConnection


class _GuardedAdapter(HTTPAdapter):
    def __init__(self, guard: WebhookGuard):
        self.guard = guard
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        http = type("GuardedHTTPPool", (HTTPConnectionPool,),
                    {"ConnectionCls": _guarded_connection(HTTPConnection, self.guard)})
        https = type("GuardedHTTPSPool", (HTTPSConnectionPool,),
                     {"ConnectionCls": _guarded_connection(HTTPSConnection, self.guard)})
        self.poolmanager.pool_classes_by_scheme = {"http": http, "https": https}
