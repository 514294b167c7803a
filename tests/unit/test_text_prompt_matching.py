"""The text-regions adapter's prompt filters, on hand-made instances (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from models.adapters.base import Instance, Prompts
from models.adapters.text_regions import (
    apply_prompts,
    box_coverage,
    filter_by_boxes,
    filter_by_points,
    filter_by_text,
    mask_contains_point,
    match_text,
    normalize_text,
    reading_order,
)

SHAPE = (20, 30)


def region(label: str, x0: int, y0: int, x1: int, y1: int) -> Instance:
    """An instance whose mask is the pixel rectangle [x0, x1) x [y0, y1)."""
    mask = np.zeros(SHAPE, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return Instance(mask=mask, score=0.9, label=label)


@pytest.fixture
def regions() -> list[Instance]:
    return [
        region("正品促销", 0, 0, 10, 5),
        region("MovieShots Dataset", 12, 0, 30, 5),
        region("１０.０起", 0, 10, 10, 15),  # full-width digits, as OCR sometimes reads them
    ]


def labels(instances: list[Instance]) -> list[str | None]:
    return [i.label for i in instances]


@pytest.mark.parametrize(
    ("label", "prompt", "expected"),
    [
        ("MovieShots Dataset", "dataset", True),
        ("MovieShots Dataset", "DATA SET", True),
        ("MovieShots Dataset", "shots data", True),
        ("Straße", "STRASSE", True),  # casefold, not lower
        ("１０.０起", "10.0", True),  # NFKC folds full-width digits
        ("正品促销", "促销", True),
        ("正品促销", "促 销", True),
        ("Dataset", "datasets", False),  # the prompt must fit inside the label
        ("Dataset", "", False),
        ("Dataset", "   ", False),
        (None, "x", False),
    ],
)
def test_match_text(label, prompt, expected):
    assert match_text(label, prompt) is expected


def test_normalize_text_removes_every_kind_of_whitespace():
    assert normalize_text(" A\tb\u3000C\n") == "abc"


def test_filter_by_text_is_or_within_the_kind(regions):
    assert labels(filter_by_text(regions, ["促销"])) == ["正品促销"]
    assert labels(filter_by_text(regions, ["促销", "dataset"])) == ["正品促销", "MovieShots Dataset"]
    assert filter_by_text(regions, ["nowhere"]) == []


@pytest.mark.parametrize(
    ("x", "y", "inside"),
    [(0, 0, True), (9.9, 4.9, True), (10, 0, False), (-0.5, 0, False), (0, 20, False), (100, 100, False)],
)
def test_mask_contains_point(x, y, inside):
    assert mask_contains_point(region("r", 0, 0, 10, 5).mask, x, y) is inside


def test_points_select_with_any_foreground_point(regions):
    assert labels(filter_by_points(regions, [(5, 2, 1)])) == ["正品促销"]
    assert labels(filter_by_points(regions, [(5, 2, 1), (5, 12, 1)])) == ["正品促销", "１０.０起"]
    assert filter_by_points(regions, [(11, 2, 1)]) == []  # between regions


def test_points_background_removes(regions):
    assert labels(filter_by_points(regions, [(5, 2, 0)])) == ["MovieShots Dataset", "１０.０起"]
    assert labels(filter_by_points(regions, [(5, 2, 1), (15, 2, 1), (15, 3, 0)])) == ["正品促销"]
    assert labels(filter_by_points(regions, [(11, 2, 0)])) == labels(regions)


def test_box_coverage_counts_pixel_centres():
    mask = region("r", 0, 0, 10, 10).mask  # 100 pixels
    assert box_coverage(mask, (0, 0, 10, 10)) == 1.0
    assert box_coverage(mask, (0, 0, 5, 10)) == 0.5
    assert box_coverage(mask, (5, 10, 0, 0)) == 0.5  # corners in any order
    assert box_coverage(mask, (0, 0, 5.4, 10)) == 0.5  # centre 5.5 is outside
    assert box_coverage(mask, (-50, -50, 500, 500)) == 1.0
    assert box_coverage(mask, (20, 0, 30, 10)) == 0.0
    assert box_coverage(np.zeros((4, 4), dtype=bool), (0, 0, 4, 4)) == 0.0


def test_boxes_need_half_the_region_inside_one_box(regions):
    assert labels(filter_by_boxes(regions, [(0, 0, 5, 20)])) == ["正品促销", "１０.０起"]
    assert filter_by_boxes(regions, [(0, 0, 4, 20)]) == []  # 40% of each
    assert labels(filter_by_boxes(regions, [(0, 0, 10, 5), (0, 10, 10, 15)])) == ["正品促销", "１０.０起"]
    # Half of the region across two boxes is not half inside one box.
    assert filter_by_boxes(regions, [(0, 0, 3, 5), (3, 0, 6, 5)]) == []


def test_no_prompt_keeps_everything(regions):
    assert apply_prompts(regions, Prompts()) == regions


def test_kinds_combine_with_and(regions):
    assert labels(apply_prompts(regions, Prompts(text=("促销", "10")))) == ["正品促销", "１０.０起"]
    assert labels(apply_prompts(regions, Prompts(text=("促销", "10"), points=((5, 12, 1),)))) == ["１０.０起"]
    assert apply_prompts(regions, Prompts(text=("促销",), boxes=((0, 10, 10, 15),))) == []
    assert labels(apply_prompts(regions, Prompts(points=((5, 12, 0),), boxes=((0, 0, 30, 20),)))) == [
        "正品促销",
        "MovieShots Dataset",
    ]


def test_reading_order_is_rows_then_columns():
    def quad(x, y):
        return np.array([[x, y], [x + 5, y], [x + 5, y + 3], [x, y + 3]], dtype=np.float32)

    polygons = [quad(50, 40), quad(60, 2), quad(0, 8), quad(10, 45), quad(30, 0)]
    # Tops within 10 px of each other form one line, read left to right.
    assert reading_order(polygons) == [2, 4, 1, 3, 0]
    assert reading_order([]) == []
