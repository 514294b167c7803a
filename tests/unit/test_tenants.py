"""Key policy, lanes, fingerprints and the auth settings: pure logic, no processes."""

from __future__ import annotations

import pytest

from config.settings import Settings
from domain.errors import InputError
from domain.tenants import ApiKey, check_policy, check_rate, hash_key, lane_allowed, new_key
from webapp.idempotency import check_key, fingerprint


def test_lanes_rank_interactive_over_default_over_batch():
    assert lane_allowed("batch", "default") and lane_allowed("default", "default")
    assert not lane_allowed("interactive", "default")
    assert all(lane_allowed(lane, "interactive") for lane in ("interactive", "default", "batch"))
    assert not lane_allowed("default", "batch")


def test_a_key_sends_unasked_jobs_to_its_lane_and_refuses_lanes_above_its_ceiling():
    key = ApiKey(key_hash="h", tenant="acme", lane="batch", max_lane="default")
    assert key.lane_for(None, "default") == "batch"
    assert key.lane_for("default", "default") == "default"
    with pytest.raises(PermissionError, match="up to 'default'"):
        key.lane_for("interactive", "default")
    # No lane of its own: the service default, lowered to the ceiling rather than refused.
    assert ApiKey(key_hash="h", tenant="a", max_lane="batch").lane_for(None, "default") == "batch"
    assert ApiKey(key_hash="h", tenant="a").lane_for(None, "interactive") == "interactive"


@pytest.mark.parametrize(
    ("tenant", "lane", "max_lane", "rate", "message"),
    [
        ("Acme", None, "interactive", None, "tenant"),
        ("a/b", None, "interactive", None, "tenant"),
        ("", None, "interactive", None, "tenant"),
        ("acme", "urgent", "interactive", None, "lane"),
        ("acme", "interactive", "default", None, "above"),
        ("acme", None, "interactive", "fast", "rate"),
    ],
)
def test_an_unusable_policy_is_refused_with_a_reason(tenant, lane, max_lane, rate, message):
    with pytest.raises(ValueError, match=message):
        check_policy(tenant, lane, max_lane, rate)


def test_good_policies_and_rates_pass():
    check_policy("acme-corp.eu_1", "batch", "default", "10/second")
    assert check_rate("600 per minute") == "600 per minute"


def test_keys_are_random_prefixed_and_only_their_hash_is_kept():
    one, two = new_key(), new_key()
    assert one != two and one.startswith("mq_") and len(one) > 40
    assert hash_key(one) == hash_key(one) != hash_key(two) and len(hash_key(one)) == 64
    record = ApiKey(key_hash=hash_key(one), tenant="acme", rate="5/second", created_at=12.5, revoked_at=13.0)
    stored = {k.encode(): v.encode() for k, v in record.to_hash().items()}
    assert one not in "".join(record.to_hash().values())
    assert ApiKey.from_hash(record.key_hash, stored) == record
    assert record.revoked and record.key_id == record.key_hash[:12]


def test_a_fingerprint_ignores_key_order_and_sees_any_change():
    image = b"\x89PNG fake"
    assert fingerprint(image, {"a": 1, "b": [1, 2]}) == fingerprint(image, {"b": [1, 2], "a": 1})
    assert fingerprint(image, {"a": 1}) != fingerprint(image, {"a": 2})
    assert fingerprint(image, {"a": 1}) != fingerprint(image + b"!", {"a": 1})


def test_an_idempotency_key_is_1_to_255_printable_ascii_characters():
    assert check_key("order-42:retry") == "order-42:retry"
    for bad in ("", "x" * 256, "tab\there", "café"):
        with pytest.raises(InputError):
            check_key(bad)


def test_auth_off_is_refused_unless_the_host_is_loopback():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert Settings(auth="off", host=host).loopback
    for host in ("0.0.0.0", "10.1.2.3", "::", "example.com"):
        with pytest.raises(ValueError, match="only allowed on a loopback address"):
            Settings(auth="off", host=host)
        assert Settings(auth="keys", host=host).auth == "keys"  # keys are fine anywhere


def test_bad_auth_settings_are_refused_at_start():
    with pytest.raises(ValueError, match="keys' or 'off"):
        Settings(auth="maybe")
    with pytest.raises(ValueError, match="COUNT/PERIOD"):
        Settings(default_rate="many")
