"""The SAM adapter on the tiny random SAM, checked against Hugging Face's own SAM pipeline.

Hugging Face's ``SamProcessor`` resizes, normalises and pads the image,
maps the prompts into the 1024 frame and crops and resizes the masks back
with code of its own; the adapter must give the same mask logits with the
exported ONNX graphs. A random model's masks mean nothing, but its logits
depend on every pixel of the frame and on where each prompt lands in it.
"""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from domain.errors import ModelError
from models.adapters.base import AdapterContext, ModelSpec, Prompts, RuntimeOptions, SegmentRequest
from models.adapters.sam import SamAdapter, preprocess_shape, upscale_logits
from models.encoder_cache import EncoderCache
from tests.conftest import ROOT

ATOL = 1e-5  # observed differences are ~3e-7; the tiny model's logits span about +-0.014


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    blurred = cv2.GaussianBlur(noise, (0, 0), 8).astype(np.float32)
    return ((blurred - blurred.min()) * 255 / np.ptp(blurred)).astype(np.uint8)


THREADS = AdapterContext(RuntimeOptions(intra_op_threads=2))


def make_adapter(
    tiny_sam, version: str = "1", cache: EncoderCache | None = None, encoder=None, **options
) -> SamAdapter:
    """The tiny SAM set up alone; ``cache``: the worker's encoder cache it shares (else one of its own)."""
    spec = ModelSpec(
        name="sam-tiny",
        version=version,
        adapter="models.adapters.sam:SamAdapter",
        files={"encoder": str(encoder or tiny_sam.encoder), "decoder": str(tiny_sam.decoder)},
        options=options,
    )
    adapter = SamAdapter(spec)
    adapter.setup(AdapterContext(THREADS.runtime, cache or EncoderCache()))
    return adapter


@pytest.fixture(scope="module")
def adapter(tiny_sam) -> SamAdapter:
    return make_adapter(tiny_sam)


@pytest.fixture(scope="module")
def reference(tiny_sam):
    """Hugging Face's SamModel (the checkpoint the ONNX files came from) and SamProcessor."""
    import torch
    from transformers import SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    torch.set_grad_enabled(False)
    model = SamModel.from_pretrained(str(tiny_sam.checkpoint)).eval()
    processor = SamProcessor(image_processor=SamImageProcessorPil())

    def logits(image: np.ndarray, multimask: bool = False, input_masks: np.ndarray | None = None, **prompts):
        inputs = processor(images=image, return_tensors="pt", **prompts)
        if input_masks is not None:
            inputs["input_masks"] = torch.from_numpy(input_masks)
        out = model(**inputs, multimask_output=multimask)
        masks = processor.post_process_masks(
            out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=False
        )[0]
        return out.iou_scores.reshape(-1).numpy(), masks.reshape(-1, *image.shape[:2]).numpy()

    return logits


def adapter_logits(adapter: SamAdapter, image: np.ndarray, **prompts) -> tuple[np.ndarray, np.ndarray]:
    """The decoder's IoU scores and every mask's logits at the original size, for the first prompt set."""
    items, metas = adapter.preprocess([SegmentRequest(image, Prompts(**prompts))])
    iou, low_res = adapter.predict(items)[0][0]
    low_res = low_res.reshape(-1, *low_res.shape[-2:])
    meta = metas[0]
    return iou.reshape(-1), np.stack(
        [upscale_logits(m, adapter.size, meta["resized"], meta["original"]) for m in low_res]
    )


@pytest.mark.parametrize("shape", [(300, 517), (517, 300)], ids=["landscape", "portrait"])
def test_a_corner_point_gives_the_logits_hugging_face_sam_computes_in_the_1024_frame(adapter, reference, shape):
    image = smooth_image(*shape)
    h, w = shape
    x, y = w - 12.0, h - 9.0  # near the bottom-right corner, where a wrong scale shows most
    want_iou, want = reference(image, input_points=[[[[x, y]]]], input_labels=[[[1]]])
    iou, got = adapter_logits(adapter, image, points=((x, y, 1),))
    assert got.shape == (4, h, w)  # the decoder's four mask tokens, at the original size
    np.testing.assert_allclose(got[0], want[0], atol=ATOL)
    np.testing.assert_allclose(iou[0], want_iou[0], atol=ATOL)
    # The same numbers left in image pixels (not mapped to the frame) give other logits.
    new_h, new_w = preprocess_shape(h, w, 1024)
    _, unmapped = adapter_logits(adapter, image, points=((x * w / new_w, y * h / new_h, 1),))
    assert np.abs(unmapped[0] - want[0]).max() > 100 * ATOL
    # And the image matters: the random encoder's output is far from zero.
    _, flipped = adapter_logits(adapter, np.ascontiguousarray(image[::-1]), points=((x, y, 1),))
    assert np.abs(flipped[0] - want[0]).max() > 100 * ATOL


def test_segment_returns_original_size_masks_thresholded_at_the_option(adapter, tiny_sam):
    image = smooth_image(301, 433, seed=1)
    _, logits = adapter_logits(adapter, image, points=((5, 7, 1), (400, 290, 0)))
    [instance] = adapter.segment([SegmentRequest(image, Prompts(points=((5, 7, 1), (400, 290, 0))))])[0]
    assert instance.mask.shape == (301, 433) and instance.mask.dtype == bool
    assert instance.label == "points"
    np.testing.assert_array_equal(instance.mask, logits[0] > 0.0)
    threshold = float(np.median(logits[0]))
    [higher] = make_adapter(tiny_sam, mask_threshold=threshold).segment(
        [SegmentRequest(image, Prompts(points=((5, 7, 1), (400, 290, 0))))]
    )[0]
    np.testing.assert_array_equal(higher.mask, logits[0] > threshold)


def test_each_box_is_its_own_prompt_and_matches_hugging_face(adapter, reference):
    image = smooth_image(300, 517, seed=2)
    boxes = ((400.0, 200.0, 510.0, 295.0), (3.0, 4.0, 90.0, 60.0))
    instances = adapter.segment([SegmentRequest(image, Prompts(boxes=boxes))])[0]
    assert [i.label for i in instances] == ["box:0", "box:1"]
    for box, instance in zip(boxes, instances):
        want_iou, want = reference(image, input_boxes=[[list(box)]])
        agree = (instance.mask == (want[0] > 0)).mean()
        assert agree > 0.999, agree  # a pixel exactly at 0 may round either way
        assert instance.score == pytest.approx(float(want_iou[0]), abs=ATOL)


def test_multimask_returns_sams_three_candidates_best_first(tiny_sam, reference):
    image = smooth_image(240, 320, seed=3)
    want_iou, want = reference(image, multimask=True, input_points=[[[[300, 220]]]], input_labels=[[[1]]])
    instances = make_adapter(tiny_sam, multimask=True).segment(
        [SegmentRequest(image, Prompts(points=((300, 220, 1),)))]
    )[0]
    assert len(instances) == 3
    order = np.argsort(-want_iou)
    assert [i.score for i in instances] == pytest.approx([float(want_iou[k]) for k in order], abs=ATOL)
    for instance, k in zip(instances, order):
        assert instance.mask.shape == (240, 320)
        assert (instance.mask == (want[k] > 0)).mean() > 0.999


def test_a_mask_prompt_is_mapped_into_the_decoders_low_res_frame(adapter, reference):
    image = smooth_image(300, 517, seed=4)
    mask = np.zeros((300, 517), dtype=bool)
    mask[150:, 260:] = True  # the bottom-right quarter
    point = (100.0, 50.0)
    items, _ = adapter.preprocess([SegmentRequest(image, Prompts(points=((*point, 1),), mask=mask))])
    feeds = items[0].calls[0].feeds
    mask_input = feeds["mask_input"]
    assert feeds["has_mask_input"].tolist() == [1.0]
    rows, cols = np.nonzero(mask_input[0, 0] > 0)
    # 300x517 is 594x1024 in the frame, 148.5x256 in the decoder's quarter-size mask frame.
    # Rows [74.25, 148.5) and columns [128.7, 256) of it, within a cell (ends are exclusive).
    assert rows.min() == pytest.approx(148.5 / 2, abs=1) and rows.max() + 1 == pytest.approx(148.5, abs=1)
    assert cols.min() == pytest.approx(256 * 260 / 517, abs=1) and cols.max() + 1 == 256
    # The decoder reads it as Hugging Face's SAM reads the same input_masks.
    _, want = reference(image, input_points=[[[list(point)]]], input_labels=[[[1]]], input_masks=mask_input)
    _, got = adapter_logits(adapter, image, points=((*point, 1),), mask=mask)
    np.testing.assert_allclose(got[0], want[0], atol=ATOL)
    _, without = adapter_logits(adapter, image, points=((*point, 1),))
    assert np.abs(got[0] - without[0]).max() > 10 * ATOL  # the mask prompt changes the masks (~6e-4)
    [alone] = adapter.segment([SegmentRequest(image, Prompts(mask=mask))])[0]
    assert alone.label == "mask" and alone.mask.shape == (300, 517)


def test_an_encoder_that_normalises_and_pads_inside_its_graph_gives_the_same_logits(adapter, tiny_sam, tmp_path):
    from tools.sam_export.sam import export_encoder, load_model

    encoder = export_encoder(load_model(tiny_sam.checkpoint), tmp_path / "encoder.onnx", encoder_input="resized")
    spec = ModelSpec(
        name="sam-tiny",
        version="1",
        adapter="models.adapters.sam:SamAdapter",
        files={"encoder": str(encoder), "decoder": str(tiny_sam.decoder)},
    )
    resized = SamAdapter(spec)
    resized.setup(THREADS)  # encoder_input "auto" reads the input's rank
    image = smooth_image(300, 517, seed=9)
    items, _ = resized.preprocess([SegmentRequest(image, Prompts(points=((9, 290, 1),)))])
    assert items[0].encoder_input.shape == (594, 1024, 3)
    _, want = adapter_logits(adapter, image, points=((9, 290, 1),))
    _, got = adapter_logits(resized, image, points=((9, 290, 1),))
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_files_that_are_not_a_sam_encoder_and_decoder_pair_fail_at_setup_with_a_clear_error(tiny_sam):
    swapped = ModelSpec(
        name="sam-bad",
        version="1",
        adapter="models.adapters.sam:SamAdapter",
        files={"encoder": str(tiny_sam.encoder), "decoder": str(tiny_sam.encoder)},
    )
    with pytest.raises(ModelError, match="the decoder lacks inputs"):
        SamAdapter(swapped).setup(AdapterContext())
    with pytest.raises(ModelError, match="gives no 'decoder' file"):
        SamAdapter(ModelSpec("sam-bad", "1", "x", files={"encoder": str(tiny_sam.encoder)})).setup(AdapterContext())


def test_a_request_with_no_prompt_segments_everything_with_one_decoder_run_per_grid_point(tiny_sam):
    keep_all = {"pred_iou_thresh": -1e9, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}
    adapter = make_adapter(tiny_sam, **keep_all)
    runs = []
    decoder_run = adapter._decoder.run
    adapter._decoder.run = lambda *args, **kwargs: runs.append(1) or decoder_run(*args, **kwargs)
    [instances] = adapter.segment([SegmentRequest(smooth_image(64, 64), Prompts(), options={"points_per_side": 3})])
    assert len(runs) == 9  # a 3 x 3 grid
    assert len(instances) <= 9 and all(i.label == "object" for i in instances)
    assert all(i.mask.shape == (64, 64) for i in instances)


def test_a_second_prompt_on_the_same_image_runs_only_the_decoder(tiny_sam):
    adapter = make_adapter(tiny_sam)
    image = smooth_image(200, 260, seed=5)
    first = adapter.segment([SegmentRequest(image, Prompts(points=((20, 30, 1),)), image_id="sha-a")])[0]
    second = adapter.segment([SegmentRequest(image, Prompts(boxes=((10, 10, 200, 150),)), image_id="sha-a")])[0]
    stats = adapter.embedding_cache.stats()
    assert (stats["encoder_runs"], stats["misses"], stats["hits"]) == (1, 1, 1)
    # The cached embedding gives what a fresh encoder run gives.
    fresh = make_adapter(tiny_sam, version="fresh")
    again = fresh.segment([SegmentRequest(image, Prompts(boxes=((10, 10, 200, 150),)), image_id="sha-a")])[0]
    assert fresh.embedding_cache.stats()["encoder_runs"] == 1
    np.testing.assert_array_equal(second[0].mask, again[0].mask)
    assert first[0].mask.shape == second[0].mask.shape == (200, 260)
    # Another image is encoded again.
    adapter.segment([SegmentRequest(image, Prompts(points=((20, 30, 1),)), image_id="sha-b")])
    assert adapter.embedding_cache.stats()["encoder_runs"] == 2


def test_models_on_the_same_encoder_file_share_its_entries_and_another_encoder_file_does_not(tiny_sam, tmp_path):
    from tools.sam_export.sam import export_encoder, load_model

    cache = EncoderCache()  # the worker process's one cache
    image = smooth_image(200, 260, seed=5)
    first = make_adapter(tiny_sam, version="1", cache=cache)
    [want] = first.segment([SegmentRequest(image, Prompts(points=((20, 30, 1),)), image_id="sha-a", scope="t")])[0]
    # Another version (or another model) on the same encoder file: the encoder does not run again.
    second = make_adapter(tiny_sam, version="2", cache=cache)
    request = SegmentRequest(image, Prompts(points=((20, 30, 1),)), image_id="sha-a", scope="t")
    [got] = second.segment([request])[0]
    assert request.report["embedding"] == {"cached": True, "source": "this worker"}
    assert (second.embedding_cache.stats()["encoder_runs"], second.embedding_cache.stats()["hits"]) == (0, 1)
    np.testing.assert_array_equal(got.mask, want.mask)
    # Another tenant's request for the same image does not find it.
    other = SegmentRequest(image, Prompts(points=((20, 30, 1),)), image_id="sha-a", scope="u")
    second.segment([other])
    assert other.report["embedding"] == {"cached": False, "source": None}
    # Another encoder file (the same weights exported otherwise) is another part: encoded again.
    encoder = export_encoder(load_model(tiny_sam.checkpoint), tmp_path / "encoder.onnx", encoder_input="resized")
    third = make_adapter(tiny_sam, version="3", cache=cache, encoder=encoder)
    third.segment([SegmentRequest(image, Prompts(points=((20, 30, 1),)), image_id="sha-a", scope="t")])
    assert third.embedding_cache.stats()["encoder_runs"] == 1
    assert third.embedding_cache.part != first.embedding_cache.part == second.embedding_cache.part


def test_a_batch_encodes_each_distinct_image_once(tiny_sam):
    adapter = make_adapter(tiny_sam)
    a, b = smooth_image(120, 160, seed=6), smooth_image(160, 120, seed=7)
    results = adapter.segment(
        [
            SegmentRequest(a, Prompts(points=((5, 5, 1),))),
            SegmentRequest(a, Prompts(points=((150, 110, 1),))),
            SegmentRequest(b, Prompts(boxes=((0, 0, 60, 60),))),
        ]
    )
    assert [r[0].mask.shape for r in results] == [(120, 160), (120, 160), (160, 120)]
    # No image_id: the pixels' hash keys the cache, so the repeated image is not encoded twice.
    assert adapter.embedding_cache.stats()["encoder_runs"] == 2


def test_the_cache_keeps_the_most_recently_used_embeddings_within_its_byte_budget(tiny_sam):
    adapter = make_adapter(tiny_sam, embedding_cache_mb=6)  # room for one 4 MiB embedding
    image = smooth_image(100, 100, seed=8)
    for image_id in ("a", "b", "a"):
        adapter.segment([SegmentRequest(image, Prompts(points=((50, 50, 1),)), image_id=image_id)])
    stats = adapter.embedding_cache.stats()
    assert (stats["encoder_runs"], stats["hits"], stats["evictions"], stats["entries"]) == (3, 0, 2, 1)
    assert stats["bytes"] == 4 * 2**20 <= stats["budget_bytes"]


def test_the_service_side_needs_neither_torch_nor_onnxruntime_at_import(tiny_sam):
    code = (
        "import sys, numpy as np\n"
        "from models.adapters.sam import SamAdapter\n"
        "from models.adapters.base import AdapterContext, ModelSpec, Prompts, SegmentRequest\n"
        f"spec = ModelSpec('s', '1', 'x', files={{'encoder': {str(tiny_sam.encoder)!r}, "
        f"'decoder': {str(tiny_sam.decoder)!r}}})\n"
        "adapter = SamAdapter(spec)\n"
        "assert 'onnxruntime' not in sys.modules\n"
        "adapter.setup(AdapterContext())\n"
        "adapter.segment([SegmentRequest(np.zeros((32, 48, 3), np.uint8), Prompts(points=((1, 1, 1),)))])\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
