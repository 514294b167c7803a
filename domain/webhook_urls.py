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
The delivery's HTTP side (a session that connects only to the address the
guard checked, within one deadline) is the worker's:
``workers/webhook_transport.py``.

An address is read as the system's resolver reads it: ``getaddrinfo`` takes
whatever ``inet_aton`` takes, so ``0x7f000001``, ``2130706433``, ``127.1`` and
``0177.0.0.1`` are 127.0.0.1 and are judged as 127.0.0.1 (refused, unless an
allowed network holds it; then the delivery reaches that very address, as its
check agrees). A host that ends in a number but is no such address (``08``,
``1.2.3.4.5``) is refused as ambiguous. Which addresses are public is decided
by an explicit list (:data:`DENIED_NETWORKS`), not by ``ipaddress`` alone:
Python 3.11's ``is_global`` misses several ranges. A refusal at delivery says
"not allowed" and never which address the name led to: the delivery log is
the client's to read, and the operator's network layout is not.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from functools import lru_cache
from typing import NoReturn
from urllib.parse import urlsplit

from domain.errors import ValidationFailed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ForbiddenAddress(Exception):
    """A webhook host resolves to an address that the service must not call; retrying cannot help.

    Not an ``OSError`` on purpose: urllib3 would take it for a network error and retry it. Its
    message is for the client (no address in it); ``address`` is for the operator's log.
    """

    def __init__(self, message: str, address: str):
        super().__init__(message)
        self.address = address


class Unresolvable(OSError):
    """A webhook host has no address (now): a network error like any other."""


NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))  # RFC 6052, RFC 8215
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # ::a.b.c.d (deprecated by RFC 4291, still routed by some stacks)
IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # ::ffff:0:a.b.c.d (SIIT, RFC 2765)

# Never a webhook receiver, whatever ``is_global`` says: IANA's special-purpose ranges that are not
# globally reachable, and the deprecated ones. Python 3.11's tables miss fec0::/10, 3fff::/20, 5f00::/16,
# ::ffff:0:0:0/96 and 192.88.99.0/24 among these. IPv4-mapped addresses (::ffff:a.b.c.d) are judged as
# their IPv4 address before this list; NAT64's 64:ff9b::/96 is public when the IPv4 address inside is.
DENIED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network" (RFC 791)
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",  # private (RFC 1918)
        "100.64.0.0/10",  # shared, carrier-grade NAT (RFC 6598)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254) among them
        "192.0.0.0/24",  # IETF protocol assignments (RFC 6890)
        "192.0.2.0/24",
        "198.51.100.0/24",
        "203.0.113.0/24",  # documentation (RFC 5737)
        "192.88.99.0/24",  # 6to4 relay anycast, deprecated (RFC 7526)
        "198.18.0.0/15",  # benchmarking (RFC 2544)
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, the limited broadcast address among them
        "::/96",  # unspecified, loopback and IPv4-compatible (deprecated, RFC 4291)
        "::ffff:0:0:0/96",  # IPv4-translated (RFC 2765): a translator elsewhere would choose the IPv4 peer
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
        "100::/64",  # discard-only (RFC 6666)
        "2001::/23",  # IETF protocol assignments (RFC 2928): Teredo, benchmarking, ORCHID, AMT among them
        "2001:db8::/32",  # documentation (RFC 3849)
        "3ffe::/16",  # the 6bone, returned (RFC 3701)
        "3fff::/20",  # documentation (RFC 9637)
        "5f00::/16",  # SRv6 segment identifiers (RFC 9602)
        "fc00::/7",  # unique local (RFC 4193)
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local, deprecated (RFC 3879)
        "ff00::/8",  # multicast
    )
)

# A host whose last label is a number is an IPv4 address or invalid (the WHATWG URL standard's rule);
# inet_aton's parts are decimal, octal (a leading 0) or hexadecimal (0x), one to four of them.
_ENDS_IN_NUMBER = re.compile(r"(?:^|\.)(?:[0-9]+|0x[0-9a-f]*)$")
_NUMERIC_HOST = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)(?:\.(?:[0-9]+|0x[0-9a-f]*)){0,3}")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to, if it carries one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in network for network in NAT64) or ip in IPV4_TRANSLATED or (ip in IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class WebhookGuard:
    """Decides which addresses a webhook may reach; ``allowed`` lists the CIDR networks let through anyway."""

    def __init__(self, allowed: tuple[str, ...] = ()):
        self.allowed = tuple(ipaddress.ip_network(n, strict=False) for n in allowed)

    def permits(self, ip: IPAddress) -> bool:
        if any(ip in network for network in self.allowed):
            return True
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:  # the system connects to the IPv4 address itself
                return self.permits(ip.ipv4_mapped)
            # An IPv6 address that carries an IPv4 one (NAT64, 6to4, Teredo, IPv4-compatible or
            # -translated) reaches that IPv4 address: it is judged as that address too.
            embedded = embedded_ipv4(ip)
            if embedded is not None and not self.permits(embedded):
                return False
        return not any(ip in network for network in DENIED_NETWORKS) and ip.is_global

    def resolve(self, host: str, port: int) -> list[str]:
        """Every address ``host`` resolves to, if all are permitted; else :class:`ForbiddenAddress`.

        All of them, not only the first: a name with one public and one
        private address would otherwise reach the private one on a retry.
        """
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError, ValueError) as exc:  # ValueError: a NUL in the name
            raise Unresolvable(f"cannot resolve {host}: {exc}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in addresses:
            if not self.permits(ipaddress.ip_address(address.split("%", 1)[0])):
                # The message goes to the delivery log, which the client reads: which internal address
                # the name led to stays out of it (it is on the exception, for the operator's log).
                raise ForbiddenAddress(
                    f"{host}: not allowed; webhooks may only call public addresses, and this name leads to a "
                    "loopback, private, link-local or otherwise non-public one (an operator can allow a "
                    "network with MASKQ_WEBHOOK_ALLOWED_NETWORKS)",
                    address,
                )
        if not addresses:
            raise Unresolvable(f"{host} has no address")
        return addresses

    def check_url(self, url: str) -> None:
        """Raise :class:`ValidationFailed` (422, field ``webhook.url``) unless ``url`` may be called."""

        def refuse(message: str) -> NoReturn:
            raise ValidationFailed(f"webhook.url: {message}", errors=[{"field": "webhook.url", "message": message}])

        try:
            parts = urlsplit(url)
            _ = parts.port  # a port out of range raises ValueError here
        except ValueError as exc:
            refuse(f"is not a valid URL: {exc}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            refuse("must be an absolute http:// or https:// URL")
        # No DNS lookup here: the name is the client's, and a slow or hostile name server would hold
        # a web thread. An address, and the names that are loopback by definition, are judged now;
        # any other name is resolved and checked at every delivery attempt (a refusal ends it for good).
        host = parts.hostname.rstrip(".").lower()
        try:
            address = host_address(host)
        except ValueError as exc:
            refuse(str(exc))
        if address is None:
            if host == "localhost" or host.endswith(".localhost"):  # RFC 6761
                address = ipaddress.ip_address("127.0.0.1")
            else:
                return
        if not self.permits(address):
            reading = "" if str(address) == host else f" (read as {address})"
            refuse(
                f"{parts.hostname}{reading} is not allowed: a loopback, private, link-local or otherwise "
                "non-public address; webhooks may only call public addresses (an operator can allow a "
                "network with MASKQ_WEBHOOK_ALLOWED_NETWORKS)"
            )


def host_address(host: str) -> IPAddress | None:
    """The address ``host`` (a URL's host, without brackets) names literally; ``None`` for a name.

    Read as ``getaddrinfo`` reads it: an IPv6 literal, or whatever ``inet_aton``
    takes for IPv4, dotted quads and their shorter, octal and hexadecimal forms
    alike. Non-ASCII hosts are first mapped as IDNA maps them (fullwidth digits
    and ideographic full stops are digits and dots). :class:`ValueError` for a
    host that ends in a number yet is no address: it is ambiguous, so refused.
    """
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None  # not a name the delivery could look up either; it fails there
    host = host.lower()
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    if not _ENDS_IN_NUMBER.search(host):
        return None
    try:
        if not _NUMERIC_HOST.fullmatch(host):
            raise OSError
        return ipaddress.IPv4Address(socket.inet_aton(host))  # the C library's own reading, as getaddrinfo's
    except OSError:
        raise ValueError(
            f"{host} ends in a number but is not an IPv4 address; a host must be a name or an address"
        ) from None


@lru_cache(maxsize=8)
def guard_for(allowed: tuple[str, ...]) -> WebhookGuard:
    return WebhookGuard(allowed)


def check_webhook_url(url: str, allowed: tuple[str, ...] = ()) -> None:
    """The submit-time check: a 422 naming ``webhook.url`` for a URL the service must not call."""
    guard_for(tuple(allowed)).check_url(url)
