"""The text-regions adapter with the real PP-OCRv4 models on the real test images."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from models.adapters.base import AdapterContext, ModelSpec, Prompts, RuntimeOptions, SegmentRequest
from models.adapters.text_regions import TextRegionsAdapter, box_coverage, bundled_model_files, match_text

IMAGES = Path(__file__).resolve().parents[1] / "data" / "images"
REPO = Path(__file__).resolve().parents[2]
SPEC = ModelSpec(name="text-regions", version="1", adapter="models.adapters.text_regions:TextRegionsAdapter")


def load(name: str) -> np.ndarray:
    with Image.open(IMAGES / name) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


@pytest.fixture(scope="module")
def adapter() -> TextRegionsAdapter:
    adapter = TextRegionsAdapter(SPEC)
    adapter.setup(AdapterContext(RuntimeOptions(intra_op_threads=2)))
    return adapter


def segment(adapter, image, **prompts):
    return adapter.segment([SegmentRequest(image, Prompts(**prompts))])[0]


@pytest.fixture(scope="module")
def product(adapter):
    """ch_en_num.jpg and every region found in it without prompts."""
    image = load("ch_en_num.jpg")
    return image, segment(adapter, image)


def target_region(instances):
    """The "正品促销" headline: the region the point and box prompts aim at."""
    return next(i for i in instances if match_text(i.label, "促销"))


def test_bundled_files_exist_and_init_stays_light():
    assert all(Path(p).is_file() for p in bundled_model_files().values())
    code = (
        "import sys; from models.adapters.text_regions import TextRegionsAdapter as A;"
        "from models.adapters.base import ModelSpec;"
        "A(ModelSpec('text-regions', '1', 'x'));"
        "assert 'onnxruntime' not in sys.modules and 'rapidocr_onnxruntime' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_text_prompt_finds_chinese(adapter, product):
    image, everything = product
    found = segment(adapter, image, text=("促销",))
    assert found and all("促销" in i.label for i in found)
    assert len(found) < len(everything)


def test_text_prompt_ignores_case(adapter):
    found = segment(adapter, load("en.jpg"), text=("dataset",))
    assert any("Dataset" in i.label for i in found)
    assert all("dataset" in i.label.casefold() for i in found)


def test_latin_line_is_read(adapter):
    found = segment(adapter, load("latin.jpg"))
    assert any(match_text(i.label, "alphabetum latinum") for i in found)


def test_exif_rotated_image_is_read_after_transpose(adapter):
    found = segment(adapter, load("img_exif_orientation.jpg"), text=("中国",))
    assert len(found) == 1 and "中国" in found[0].label


def test_black_image_has_no_instances(adapter):
    assert segment(adapter, load("empty_black.jpg")) == []


def test_batch_keeps_requests_apart(adapter):
    black, english = adapter.segment([SegmentRequest(load("empty_black.jpg")), SegmentRequest(load("en.jpg"))])
    assert black == [] and any("Dataset" in i.label for i in english)


def test_instances_are_in_reading_order(adapter, product):
    _, everything = product
    assert match_text(everything[0].label, "正品促销")
    labels = [i.label for i in segment(adapter, load("en.jpg"))]
    assert labels.index("MovieShots") < labels.index("Dataset")


def test_point_selects_exactly_its_region(adapter, product):
    image, everything = product
    target = target_region(everything)
    # A pixel of the target that no other region covers, nearest the target's centre.
    others = np.any([i.mask for i in everything if i is not target], axis=0)
    ys, xs = np.nonzero(target.mask & ~others)
    k = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    found = segment(adapter, image, points=((float(xs[k]) + 0.5, float(ys[k]) + 0.5, 1),))
    assert len(found) == 1
    assert found[0].label == target.label and np.array_equal(found[0].mask, target.mask)
    without = segment(adapter, image, points=((float(xs[k]) + 0.5, float(ys[k]) + 0.5, 0),))
    assert [i.label for i in without] == [i.label for i in everything if i is not target]


def test_box_selects_its_region_and_nothing_outside(adapter, product):
    image, everything = product
    target = target_region(everything)
    ys, xs = np.nonzero(target.mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    found = segment(adapter, image, boxes=(box,))
    assert any(i.label == target.label and np.array_equal(i.mask, target.mask) for i in found)
    assert all(box_coverage(i.mask, box) >= 0.5 for i in found)
    outside = [i for i in everything if box_coverage(i.mask, box) == 0]
    assert outside and not any(any(np.array_equal(i.mask, o.mask) for o in outside) for i in found)


def test_masks_fill_their_polygons(adapter, product):
    image, everything = product
    tensors, metas = adapter.preprocess([SegmentRequest(image)])
    regions = [r for r in adapter.predict(tensors)[0] if r.rec_score >= adapter.options["text_score"]]
    instances = adapter.postprocess([regions], metas)[0]
    assert len(instances) == len(regions) == len(everything) > 5
    for region, instance in zip(regions, instances):
        assert instance.mask.shape == image.shape[:2] and instance.mask.dtype == bool
        assert isinstance(instance.score, float) and 0 < instance.score <= 1
        assert instance.label == region.text and instance.label
        ys, xs = np.nonzero(instance.mask)
        (x0, y0), (x1, y1) = region.polygon.min(axis=0), region.polygon.max(axis=0)
        assert len(ys) > 0
        assert math.floor(x0) <= xs.min() and xs.max() <= math.ceil(x1)
        assert math.floor(y0) <= ys.min() and ys.max() <= math.ceil(y1)


@pytest.mark.parametrize("shape", [(1, 1), (2, 300), (300, 2), (1, 5000)])
def test_a_degenerate_image_gets_a_bounded_detector_input_and_no_regions(adapter, shape):
    """A 1x1 upload once became a 736 x 43000 detector input (6 GB, a minute): a denial of service."""
    image = np.zeros((*shape, 3), np.uint8)
    tensors, _ = adapter.preprocess([SegmentRequest(image)])
    assert max(tensors[0]["det_input"].shape[2:]) <= 6016
    assert adapter.segment([SegmentRequest(image)]) == [[]]
