"""SAM 2 end to end: a transformers SAM 2 checkpoint folder, exported by the tool, served by a real worker.

The tiny random SAM 2 (tests/integration/sam2_fixtures.py) is served from the
manifest entry the tool printed, through the API and one worker process of a
stack of this module's own, and its masks are compared with transformers'
``Sam2Model`` on the same pixels and prompts, preprocessed as ``Sam2Processor``
does (``Sam2ImageProcessor`` itself needs torchvision, which has no build for
the CPU torch here: its uint8 antialiased bilinear resize is torch's, done
below).
"""

from __future__ import annotations

import shutil
from typing import Any

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from domain.images import decode_image
from tests.conftest import IsolatedStack, image_bytes
from tests.integration.helpers import decode, run_to_end
from tests.integration.sam2_fixtures import SAM2_MODEL, TinySam2, export_tiny_sam2

IMAGE = "ch_en_num.jpg"  # 323 x 430: portrait, so the stretched square frame scales x and y apart
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # Sam2ImageProcessor's image_mean and image_std
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def tiny_sam2(tmp_path_factory) -> TinySam2:
    return export_tiny_sam2(tmp_path_factory.mktemp("tiny-sam2"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, base_env, tiny_sam2: TinySam2):
    """An API client and one worker process serving the tool's entry (segment everything's filters off:
    a random model's predicted IoU and stability are far under SAM's thresholds)."""
    folder = tmp_path_factory.mktemp("sam2-stack")
    manifest = tiny_sam2.manifest(folder / "models.toml", pred_iou_thresh=0.0, stability_score_thresh=0.0)
    isolated = IsolatedStack.start(folder, base_env)
    try:
        isolated.worker("sam2", MASKQ_MODELS_MANIFEST=manifest)
        yield isolated.client(models_manifest=manifest)
    finally:
        isolated.close()


@pytest.fixture(scope="module")
def reference(tiny_sam2: TinySam2):
    """transformers' own SAM 2 on the test image: ``(prompts) -> (mask at the original size, score)``."""
    import torch
    from torch.nn import functional as F
    from transformers import Sam2Model

    model = Sam2Model.from_pretrained(str(tiny_sam2.checkpoint)).eval()
    size = model.config.prompt_encoder_config.image_size
    pixels = decode_image(image_bytes(IMAGE), max_bytes=10**8, max_pixels=10**8).pixels
    height, width = pixels.shape[:2]
    # Sam2ImageProcessor: a uint8 antialiased bilinear resize to the square (aspect ratio not kept), then
    # the fused rescale-and-normalise.
    image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None]
    resized = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean, std = (torch.tensor(v).reshape(1, 3, 1, 1) * 255 for v in (IMAGENET_MEAN, IMAGENET_STD))
    embeddings = model.get_image_embeddings((resized.float() - mean) / std)  # (under no_grad)
    scale = torch.tensor([size / width, size / height])  # Sam2Processor's coordinate normalisation

    def run(points=None, box=None, mask_logits=None) -> tuple[np.ndarray, float]:
        prompts = {}
        if points is not None:
            prompts["input_points"] = (torch.tensor(points, dtype=torch.float32)[:, :2] * scale)[None, None]
            prompts["input_labels"] = torch.tensor([p[2] for p in points])[None, None]
        if box is not None:
            prompts["input_boxes"] = (torch.tensor(box, dtype=torch.float32).reshape(2, 2) * scale).reshape(1, 1, 4)
        if mask_logits is not None:
            prompts["input_masks"] = torch.from_numpy(mask_logits)[None, None]
        with torch.no_grad():
            out = model(image_embeddings=embeddings, multimask_output=False, **prompts)
        # Sam2ImageProcessor.post_process_masks: the low-res logits straight to the original size.
        logits = F.interpolate(out.pred_masks[0], (height, width), mode="bilinear", align_corners=False)
        return logits[0, 0].numpy() > 0, float(out.iou_scores[0, 0, 0])

    return run


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def served(client, prompts: dict, image: str = IMAGE) -> dict:
    job = run_to_end(client, image_bytes(image), {"model": SAM2_MODEL, "prompts": prompts})
    assert job["status"] == "succeeded", job
    return job


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode()}


def test_the_tool_prints_a_manifest_entry_that_serves_sam2_with_the_sam_adapter(tiny_sam2):
    entry = tiny_sam2.entry()
    assert entry["adapter"] == "models.adapters.sam:SamAdapter"
    assert entry["options"]["frame"] == "stretched" and entry["options"]["decoder_adds_padding_point"] is True
    assert set(entry["files"]) == {"encoder", "decoder"} and set(entry["sha256"]) == {"encoder", "decoder"}
    import onnxruntime as ort

    encoder = ort.InferenceSession(entry["files"]["encoder"], providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(entry["files"]["decoder"], providers=["CPUExecutionProvider"])
    features = ["high_res_feats_0", "high_res_feats_1"]
    assert [o.name for o in encoder.get_outputs()] == ["image_embeddings", *features]
    assert [i.name for i in decoder.get_inputs()][-2:] == features


MASK_PROMPT = np.zeros((430, 323), dtype=bool)
MASK_PROMPT[60:380, 40:280] = True
PROMPTS: dict[str, dict[str, Any]] = {
    "point": {"points": [[150, 300, 1]]},
    "points and a box": {"points": [[60, 40, 1], [250, 400, 0]], "boxes": [[20, 30, 300, 410]]},
    "mask": {"mask": rle(MASK_PROMPT)},
}


def mask_logits(mask: np.ndarray) -> np.ndarray:
    """The adapter's documented conversion of a binary mask prompt: into the 1024 frame, area-averaged to
    the decoder's low-res side, +-10 logits (a previous prediction's logits would do as well)."""
    frame = cv2.resize(mask.astype(np.float32), (1024, 1024), interpolation=cv2.INTER_LINEAR)
    low = cv2.resize(frame, (256, 256), interpolation=cv2.INTER_AREA)
    return np.where(low > 0.5, 10.0, -10.0).astype(np.float32)


@pytest.mark.parametrize("kind", PROMPTS)
def test_a_served_sam2_mask_and_score_are_transformers_own(stack, reference, kind):
    prompts = PROMPTS[kind]
    job = served(stack, prompts)
    [instance] = job["result"]["instances"]
    expected, score = reference(
        points=prompts.get("points"),
        box=prompts["boxes"][0] if "boxes" in prompts else None,
        mask_logits=mask_logits(MASK_PROMPT) if "mask" in prompts else None,
    )
    mask = decode(instance["mask"])
    assert mask.shape == expected.shape == (430, 323)
    assert expected.any() and not expected.all()  # a mask with edges to get wrong
    assert iou(mask, expected) >= 0.99
    assert instance["score"] == pytest.approx(score, abs=1e-3)


def test_a_second_prompt_on_the_same_image_runs_only_sam2s_decoder(stack):
    first = served(stack, {"points": [[100, 100, 1]]}, image="latin.jpg")
    assert first["result"]["embedding"] == {"cached": False, "source": None}
    second = served(stack, {"boxes": [[10, 10, 120, 90]]}, image="latin.jpg")
    # The high-resolution features came from the cache with the embedding: the decoder needs both.
    assert second["result"]["embedding"] == {"cached": True, "source": "this worker"}
    assert [i["label"] for i in second["result"]["instances"]] == ["box:0"]


def test_segment_everything_on_sam2_returns_instances(stack):
    job = run_to_end(stack, image_bytes(IMAGE), {"model": SAM2_MODEL, "points_per_side": 4})
    assert job["status"] == "succeeded", job
    instances = job["result"]["instances"]
    assert instances and {i["label"] for i in instances} == {"object"}
    scores = [i["score"] for i in instances]
    assert scores == sorted(scores, reverse=True)
    assert all(decode(i["mask"]).shape == (430, 323) and i["area"] > 0 for i in instances)


def test_the_tool_refuses_a_truncated_sam2_weights_file_with_one_line_and_status_2(tiny_sam2, tmp_path, capsys):
    from tools.export_sam import main

    checkpoint = tmp_path / "sam2.1-hiera-tiny"
    shutil.copytree(tiny_sam2.checkpoint, checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut off
    assert main([str(checkpoint), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"export_sam: {checkpoint}: the weights could not be read")
    assert not (tmp_path / "out" / "manifest.toml").exists()


def test_a_sam2_video_checkpoint_exports_the_same_image_model_as_its_image_checkpoint(tiny_sam2, tmp_path):
    import torch
    from transformers import Sam2VideoConfig, Sam2VideoModel

    from tools.sam_export.checkpoint import read_family
    from tools.sam_export.sam2 import load_model

    image = load_model(tiny_sam2.checkpoint)
    parts = ("vision_config", "prompt_encoder_config", "mask_decoder_config")
    config = Sam2VideoConfig(**{part: getattr(image.config, part).to_dict() for part in parts})
    video = Sam2VideoModel(config)  # the image model's weights plus memory modules of its own
    assert not video.load_state_dict(image.state_dict(), strict=False).unexpected_keys
    video.save_pretrained(str(tmp_path / "video"))
    assert read_family(tmp_path / "video") == "sam2"
    loaded = load_model(tmp_path / "video")  # what the tool exports from a sam2_video folder
    theirs = loaded.state_dict()
    assert theirs.keys() == image.state_dict().keys()
    assert all(torch.equal(tensor, theirs[name]) for name, tensor in image.state_dict().items())
