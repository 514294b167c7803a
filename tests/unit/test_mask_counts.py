"""A client's COCO RLE counts are checked before pycocotools sees them: exactly, in linear time, in the request's
words."""

from __future__ import annotations

import re

import numpy as np
import pytest

from domain import masks


def test_a_valid_rle_passes_and_decodes_to_the_same_mask():
    mask = np.zeros((40, 60), bool)
    mask[5:30, 10:50] = True
    rle = masks.encode(mask)
    masks.check_counts(rle["counts"], 40 * 60)
    assert np.array_equal(masks.decode(rle), mask)


def test_a_run_that_never_ends_is_refused_within_a_few_characters_whatever_the_length():
    endless = (
        "P" * 400_000
    )  # within the length bound; every character says "the run goes on": a parser that grows the number is quadratic
    with pytest.raises(ValueError) as caught:
        masks.check_counts(endless, 132 * 709)
    message = str(caught.value)
    assert "a run (at character 0) longer than the whole 93588-pixel mask" in message
    assert "limit" not in message and "digits" not in message  # no Python internals in a client's answer


def test_counts_far_longer_than_any_mask_of_this_size_is_refused_before_parsing():
    with pytest.raises(ValueError, match="characters long; a mask of 100 pixels needs far fewer"):
        masks.check_counts("1" * 10_000, 100)


@pytest.mark.parametrize(
    ("counts", "what"),
    [
        ("U3", "covers more than the mask's 100 pixels"),
        ("4", "covers 4 pixels; the mask has 100"),
        ("0 ", "invalid character ' ' at character 1"),
        ("P", "ends in the middle of a run"),
    ],
)
def test_malformed_counts_say_what_is_wrong_and_where(counts, what):
    with pytest.raises(ValueError, match=re.escape(what)):
        masks.check_counts(counts, 100)
