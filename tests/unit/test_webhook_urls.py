"""The webhook URL guard's reading of hosts and its list of denied ranges, as pure logic.

Nothing here connects anywhere: the guard is called directly, and the system's
resolver is asked only with ``AI_NUMERICHOST`` (it parses, it looks nothing up)
or for ``localhost`` (``/etc/hosts``).
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from domain.errors import ValidationFailed
from domain.webhook_urls import DENIED_NETWORKS, ForbiddenAddress, WebhookGuard, check_webhook_url, host_address

LOOPBACK_ALLOWED = ("127.0.0.0/8",)  # what the test settings allow (MASKQ_WEBHOOK_ALLOWED_NETWORKS)


def refused(url: str, allowed: tuple[str, ...] = ()) -> str:
    with pytest.raises(ValidationFailed) as caught:
        check_webhook_url(url, allowed)
    assert caught.value.status == 422
    assert [e["field"] for e in caught.value.errors] == ["webhook.url"]
    return caught.value.errors[0]["message"]


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("0x7f000001", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7F.0.0.1", "127.0.0.1"),
        ("0xa9fea9fe", "169.254.169.254"),
        ("0251.0376.0251.0376", "169.254.169.254"),
        ("10.1", "10.0.0.1"),
        ("167772161", "10.0.0.1"),
        ("0", "0.0.0.0"),
        ("00000127.0.0.1", "87.0.0.1"),
    ],
)
def test_a_numeric_host_is_read_as_the_systems_resolver_reads_it(host, address):
    assert host_address(host) == ipaddress.IPv4Address(address)
    # getaddrinfo, which the delivery calls, reads it the same way (AI_NUMERICHOST: parsing only, no lookup).
    assert socket.getaddrinfo(host, 80, socket.AF_INET, flags=socket.AI_NUMERICHOST)[0][4][0] == address


@pytest.mark.parametrize(
    "url",
    [
        "http://0x7f000001/",
        "http://2130706433/",
        "http://127.1/",
        "http://0177.0.0.1/",
        "http://0x7f.1:8080/hook",
        "http://0xa9fea9fe/latest/meta-data/",
        "http://167772161/",
        "http://10.1/",
        "http://0/",
        "http://１２７.０.０.１/",  # fullwidth digits: IDNA maps them to 127.0.0.1
        "http://127。0。0。1/",  # ideographic full stops
    ],
)
def test_numeric_forms_of_non_public_addresses_are_refused_at_submit(url):
    assert "not allowed" in refused(url)


def test_a_numeric_form_of_an_allowed_address_is_judged_as_that_address():
    # Loopback allowed (as in the tests): 127.1 is 127.0.0.1 and passes, as the delivery would let it;
    # a numeric form of 10.0.0.1 is still 10.0.0.1 and is refused.
    check_webhook_url("http://127.1:9/hook", LOOPBACK_ALLOWED)
    check_webhook_url("http://0x7f000001:9/hook", LOOPBACK_ALLOWED)
    assert "read as 10.0.0.1" in refused("http://0x0a000001/hook", LOOPBACK_ALLOWED)
    assert "read as 169.254.169.254" in refused("http://2852039166/", LOOPBACK_ALLOWED)


@pytest.mark.parametrize(
    "url",
    [
        "http://08/",
        "http://1.2.3.4.5/",
        "http://256.0.0.1/",
        "http://4294967296/",
        "http://0x/",
        "http://foo.123/",
        "http://example.0x10/",
        "http://1.2.3.0x1ff/",
    ],
)
def test_a_host_that_ends_in_a_number_but_is_no_address_is_refused_as_ambiguous(url):
    assert "ends in a number" in refused(url)


@pytest.mark.parametrize(
    "host", ["example.com", "0x.example.com", "1.example", "hooks-1.example.org", "bücher.example"]
)
def test_a_name_stays_a_name_for_the_delivery_to_resolve(host):
    assert host_address(host) is None
    check_webhook_url(f"https://{host}/hook")


# One address in each denied range; the last test below checks that every range has one.
DENIED_EXAMPLES = [
    "0.1.2.3",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "100.100.100.200",
    "127.0.0.1",
    "169.254.169.254",
    "192.0.0.8",
    "192.0.2.1",
    "198.51.100.7",
    "203.0.113.9",
    "192.88.99.1",
    "198.18.0.1",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "::",
    "::1",
    "::a00:1",
    "::8.8.8.8",  # IPv4-compatible, even of a public address
    "::ffff:0:7f00:1",
    "::ffff:0:a9fe:a9fe",
    "::ffff:0:808:808",  # IPv4-translated, even of a public address
    "64:ff9b:1::808:808",  # local-use NAT64
    "100::1",
    "2001::1",
    "2001:2::1",
    "2001:10::1",
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo
    "2001:db8::1",
    "3ffe::1",
    "3fff::1",
    "3fff:fff::1",
    "5f00::1",
    "fc00::1",
    "fd00:ec2::254",
    "fe80::1",
    "fec0::1",
    "feff::1",
    "ff02::1",
]


@pytest.mark.parametrize("address", DENIED_EXAMPLES)
def test_every_denied_range_is_refused_by_the_guard_and_at_submit(address):
    ip = ipaddress.ip_address(address)
    assert not WebhookGuard().permits(ip)
    refused(f"http://[{address}]/hook" if ip.version == 6 else f"http://{address}/hook")


@pytest.mark.parametrize("address", ["::ffff:0:7f00:1", "::a00:1", "64:ff9b:1::7f00:1"])
def test_ipv6_forms_of_an_allowed_ipv4_address_other_than_mapped_stay_refused(address):
    # Only an IPv4-mapped address is one the system itself connects to over IPv4; a translator
    # elsewhere would pick the peer of the others, so allowing 127.0.0.0/8 does not admit them.
    assert not WebhookGuard(LOOPBACK_ALLOWED).permits(ipaddress.ip_address(address))
    assert WebhookGuard(LOOPBACK_ALLOWED).permits(ipaddress.ip_address("::ffff:127.0.0.1"))


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "2606:4700::1111",
        "2a00:1450:4001:80b::200e",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",  # IPv4-mapped and NAT64 of a public address
    ],
)
def test_public_addresses_pass(address):
    assert WebhookGuard().permits(ipaddress.ip_address(address))


def test_the_deny_list_has_a_tested_example_in_every_range():
    covered = {net for net in DENIED_NETWORKS for a in DENIED_EXAMPLES if ipaddress.ip_address(a) in net}
    assert set(DENIED_NETWORKS) - covered == set()


def test_a_refusal_at_delivery_says_not_allowed_and_not_where_the_name_led():
    answers = {info[4][0] for info in socket.getaddrinfo("localhost", 9, type=socket.SOCK_STREAM)}
    with pytest.raises(ForbiddenAddress) as caught:
        WebhookGuard().resolve("localhost", 9)
    message = str(caught.value)
    assert "not allowed" in message
    assert not [a for a in answers if a in message]  # the client reads this; the address is the operator's
    assert caught.value.address in answers  # kept for the operator's log
