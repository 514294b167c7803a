"""Reading the ``Cancel-After`` header (pure): units as Replicate takes them, bounds, and the OpenAPI pattern."""

from __future__ import annotations

import re

import pytest

from domain.cancel_after import MAX_S, MIN_S, PATTERN, parse_cancel_after
from domain.errors import InputError, ValidationFailed


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30),
        ("30", 30),
        ("5m", 300),
        ("1h30m", 5400),
        ("1h30m45s", 5445),
        ("1.5h", 5400),
        (" 2m ", 120),
        ("24h", MAX_S),
        ("5", MIN_S),
    ],
)
def test_a_duration_reads_as_seconds_and_matches_the_documented_pattern(value, seconds):
    assert parse_cancel_after(value) == seconds
    assert re.fullmatch(PATTERN, value.strip())


def test_no_header_is_no_cancel_after():
    assert parse_cancel_after(None) is None


@pytest.mark.parametrize("value", ["", "soon", "5ms", "1m1h", "-5", "1e3", "nan", "inf", "5.", "٣٠", "9" * 40])
def test_an_unreadable_value_is_a_400_naming_the_header(value):
    with pytest.raises(InputError) as refused:
        parse_cancel_after(value)
    assert refused.value.status == 400 and refused.value.errors[0]["field"] == "Cancel-After"


@pytest.mark.parametrize("value", ["4s", "0", "4.9", "24h0m1s", "25h", "99999999999h"])
def test_a_value_out_of_range_is_a_422_naming_the_header(value):
    with pytest.raises(ValidationFailed) as refused:
        parse_cancel_after(value)
    assert refused.value.status == 422 and refused.value.errors[0]["field"] == "Cancel-After"
