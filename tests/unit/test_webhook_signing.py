"""Webhook signatures, retry pauses and the address guard, as pure logic."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from domain.errors import ValidationFailed
from domain.records import JobRecord
from domain.webhook_urls import WebhookGuard, check_webhook_url
from domain.webhooks import next_pause, retry_after_seconds, sign, wanted_events

# The Standard Webhooks specification's own example.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = '{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_signature_of_the_specs_example_is_the_one_the_spec_gives():
    headers = sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
    assert headers == {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TIMESTAMP),
        "webhook-signature": SPEC_SIGNATURE,
    }


def test_the_signature_is_hmac_sha256_of_id_timestamp_body_keyed_by_the_decoded_secret():
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    body = '{"id": "abc", "status": "succeeded", "label": "促销"}'
    expected = hmac.new(b"k" * 32, f"msg_1.1700000000.{body}".encode(), hashlib.sha256).digest()
    assert sign(secret, "msg_1", 1700000000, body)["webhook-signature"] == "v1," + base64.b64encode(expected).decode()


def test_a_receiver_verifies_a_fresh_signature_and_rejects_a_changed_body():
    import time

    secret = "whsec_" + base64.b64encode(b"s" * 24).decode()
    body = '{"id": "j1", "status": "succeeded"}'
    headers = sign(secret, "msg_2", int(time.time()), body)
    assert Webhook(secret).verify(body, headers) == {"id": "j1", "status": "succeeded"}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace("succeeded", "failed"), headers)


def test_pauses_follow_the_schedule_within_the_jitter_and_end_with_it():
    schedule = (5.0, 300.0, 1800.0)
    for attempt, base in enumerate(schedule, start=1):
        pauses = [next_pause(attempt, schedule, 0.1, None, 3600) for _ in range(200)]
        assert all(base * 0.9 <= p <= base * 1.1 for p in pauses)
        assert len(set(pauses)) > 1  # jittered, so a fleet of retries does not arrive in step
    assert next_pause(len(schedule) + 1, schedule, 0.1, None, 3600) is None


def test_retry_after_lengthens_a_pause_but_never_past_its_cap():
    assert next_pause(1, (1.0,), 0, retry_after=30, retry_after_max=3600) == 30
    assert next_pause(1, (1.0,), 0, retry_after=10**6, retry_after_max=3600) == 3600
    assert next_pause(1, (60.0,), 0, retry_after=2, retry_after_max=3600) == 60


def test_retry_after_is_read_as_seconds_or_as_an_http_date():
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470) == 10
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


def record_with(webhook: dict | None) -> JobRecord:
    return JobRecord(
        id="a" * 32,
        tenant="default",
        lane="default",
        model="m",
        input_key="k",
        image_sha256="",
        width=1,
        height=1,
        request={"webhook": webhook} if webhook else {},
    )


def test_a_job_gets_only_the_events_it_asked_for_and_by_default_the_ending_ones():
    assert wanted_events(record_with(None)) is None
    assert wanted_events(record_with({"url": "https://x.example/h"})) == (
        "https://x.example/h",
        ("job.succeeded", "job.failed"),
    )
    assert wanted_events(record_with({"url": "https://x.example/h", "events": ["job.started"]}))[1] == ("job.started",)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.100.100.200",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fd00:ec2::254",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
    ],
)
def test_non_public_addresses_are_refused_by_default(address):
    assert not WebhookGuard().permits(ipaddress.ip_address(address))


def test_public_addresses_pass_and_an_allowed_network_admits_its_private_addresses():
    assert WebhookGuard().permits(ipaddress.ip_address("93.184.216.34"))
    assert WebhookGuard().permits(ipaddress.ip_address("2606:4700::1111"))
    guard = WebhookGuard(("10.20.0.0/16",))
    assert guard.permits(ipaddress.ip_address("10.20.3.4"))
    assert not guard.permits(ipaddress.ip_address("10.21.3.4"))


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::a00:1",
        "64:ff9b::7f00:1",
        "64:ff9b:1::a9fe:a9fe",  # NAT64 of 10.0.0.1, 127.0.0.1, 169.254.169.254
        "2002:a00:1::1",
        "2002:7f00:1::",  # 6to4 of 10.0.0.1, 127.0.0.1
        "::a00:1",
        "::127.0.0.1",
        "::169.254.169.254",  # IPv4-compatible
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, its client 10.0.0.1 (stored inverted)
        "::ffff:10.0.0.1",  # IPv4-mapped
    ],
)
def test_an_ipv6_address_that_carries_a_private_ipv4_address_is_judged_as_that_address(address):
    guard = WebhookGuard()
    assert not guard.permits(ipaddress.ip_address(address))
    with pytest.raises(ValidationFailed):
        check_webhook_url(f"http://[{address}]/hook")  # refused at submit: no delivery ever starts


def test_an_ipv6_address_carrying_a_public_ipv4_address_is_judged_by_both():
    guard = WebhookGuard()
    assert guard.permits(ipaddress.ip_address("::ffff:93.184.216.34"))
    assert guard.permits(ipaddress.ip_address("2606:4700:4700::1111"))  # no IPv4 inside: an ordinary address


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.5/hook",
        "http://[::1]:8080/hook",
        "ftp://93.184.216.34/hook",
        "not a url",
        "http:///nohost",
    ],
)
def test_a_url_that_must_not_be_called_is_a_422_naming_the_field(url):
    with pytest.raises(ValidationFailed) as caught:
        check_webhook_url(url)
    assert caught.value.status == 422
    assert caught.value.errors[0]["field"] == "webhook.url"
