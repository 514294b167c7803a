"""SAM 3: a transformers ``Sam3Model`` folder (``facebook/sam3``) to the ONNX parts of its concept prompts.

SAM 3 finds *every* instance of a concept: a phrase ("cup", "red car"), and/or
exemplar boxes (positive: "things like this", negative: "not like this").
transformers' ``Sam3Model.forward`` takes the image and the phrase already
encoded (``vision_embeds``, ``text_embeds``), so the export cuts it there, and
each part is cached on its own by the service:

* ``vision_encoder.onnx``: ``pixel_values`` ``[1, 3, S, S]`` (the image resized
  to S x S, 1008 for facebook/sam3, scaled to 0-1 and normalised with mean 0.5,
  std 0.5) -> ``backbone_features`` ``[1, C, S/14, S/14]``: the ViT backbone's
  output, before any neck. Cached per image (the shared embedding cache): 21 MB
  for facebook/sam3 in float32, where the detector neck's pyramid would be
  111 MB; the neck is a few convolutions, run in the detector graph.
* ``text_encoder.onnx``: ``input_ids``, ``attention_mask`` ``[1, L]`` int64 (the
  CLIP tokenizer's ids, padded to L = 32) -> ``text_features`` ``[1, L, D]``.
  Cached per phrase and model version.
* ``detector.onnx``: ``backbone_features``, ``text_features``, ``text_mask`` ``[1, L]``
  int64 -> ``pred_masks`` ``[1, Q, S/3.5, S/3.5]`` logits, ``pred_boxes``
  ``[1, Q, 4]`` (x0, y0, x1, y1 in 0-1), ``pred_logits`` ``[1, Q]``,
  ``presence_logits`` ``[1, 1]``: the vision neck, DETR encoder and decoder, box
  head, scoring and mask head, as ``Sam3Model.forward`` runs them.
* ``exemplar_detector.onnx``: the same with ``input_boxes`` ``[1, K, 4]`` (cx,
  cy, w, h in 0-1) and ``input_boxes_labels`` ``[1, K]`` int64 (1 positive, 0
  negative): the geometry encoder's box tokens join the phrase's. A separate
  graph because the model takes that branch only when there are boxes, and a
  traced graph keeps one branch.
* ``tokenizer.json``: copied from the checkpoint; the service reads it with the
  light ``tokenizers`` package (no transformers at run time).

A ``sam3_video`` checkpoint (what ``facebook/sam3`` is) also holds SAM 3's
tracker, a SAM-2-style head for one object's points, boxes or mask
(transformers' ``Sam3TrackerModel``, on the *same* backbone with a neck of its
own). Two more parts serve it, so a click costs no second backbone run:

* ``tracker_encoder.onnx``: ``backbone_features`` -> ``image_embeddings``,
  ``high_res_feats_0``, ``high_res_feats_1`` (the tracker's neck, its decoder's
  high-resolution projections and its no-memory embedding:
  ``Sam3TrackerModel.get_image_embeddings`` after the backbone).
* ``tracker_decoder.onnx``: SAM 2's decoder layout (tools/sam_export/sam2.py).

The check runs the tracker's own ``get_image_embeddings`` on the image, which
proves the backbone is the detector's.

A score is ``sigmoid(pred_logits) * sigmoid(presence_logits)``, as transformers'
``post_process_instance_segmentation`` computes it.

The geometry encoder pools box features with ``torchvision.ops.roi_align``;
without torchvision here, tools/sam_export/roi_align.py stands in (and exports
as ONNX RoiAlign).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tools.sam_export import roi_align
from tools.sam_export.checkpoint import load_error
from tools.sam_export.common import Exported, ExportOptions

OPSET = 18  # RoiAlign's output_half_pixel mode needs 16; 18 is what FIELD-NOTES checked
TEXT_LENGTH = 32  # Sam3Processor pads every phrase to 32 tokens
VISION_OUTPUTS = ("backbone_features",)
DETECTOR_OUTPUTS = ("pred_masks", "pred_boxes", "pred_logits", "presence_logits")
PIXEL_MEAN = (0.5, 0.5, 0.5)  # Sam3ImageProcessor's, on 0-1 RGB
PIXEL_STD = (0.5, 0.5, 0.5)

# The tiny random model the tests use (FIELD-NOTES "SAM 3 and SAM 2 in transformers"), with a 514-token
# byte-level vocabulary (tiny_tokenizer) instead of CLIP's 49,408.
_SMALL = {"hidden_size": 32, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
TINY_CONFIG: dict[str, Any] = {
    "vision_config": {
        "backbone_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 14,
            "window_size": 8,
            "pretrain_image_size": 112,
        },
        "fpn_hidden_size": 32,
        "backbone_feature_sizes": [[64, 64], [32, 32], [16, 16]],
    },
    "text_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": 32,
        "vocab_size": 514,
        "bos_token_id": 512,
        "eos_token_id": 513,
        "pad_token_id": 513,
    },
    "geometry_encoder_config": _SMALL,
    "detr_encoder_config": _SMALL,
    "detr_decoder_config": {**_SMALL, "num_queries": 20},
    "mask_decoder_config": {"hidden_size": 32, "num_attention_heads": 2},
}


TINY_INIT = 0.1


def tiny_tokenizer() -> Any:
    """A CLIP tokenizer over the 256 byte symbols (each also with ``</w>``) and CLIP's two specials, no merges."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_random_checkpoint(folder: Path, seed: int = 0) -> None:
    """Save a tiny random SAM 3 (detector and tracker: a ``sam3_video`` folder, as ``facebook/sam3`` is) and its
    tokenizer as a hub download would look."""
    from safetensors.torch import load_file, save_file
    from transformers import Sam3VideoConfig, Sam3VideoModel

    torch.manual_seed(seed)
    # Random weights at transformers' default scale (0.02) give every phrase, box and image nearly the same
    # answer (scores 0.25 +- 0.003, boxes equal within 1e-6): a test could not tell a wrong input from a right
    # one. At 0.1 a phrase moves scores by ~0.07 and boxes by ~1% of the image, far above the tolerances.
    detector = {k: dict(v, initializer_range=TINY_INIT) if isinstance(v, dict) else v for k, v in TINY_CONFIG.items()}
    tracker = {
        "vision_config": {**TINY_CONFIG["vision_config"], "model_type": "sam3_vision_model"},
        "prompt_encoder_config": {"hidden_size": 32, "image_size": 224},
        "mask_decoder_config": {"hidden_size": 32},
        "image_size": 224,
        "initializer_range": TINY_INIT,
    }
    config = Sam3VideoConfig(detector_config=detector, tracker_config=tracker, initializer_range=TINY_INIT)
    model = Sam3VideoModel(config).eval()
    # Zero at initialisation: random here, so a graph that left it out would differ from PyTorch.
    model.tracker_model.no_memory_embedding.data.normal_(std=TINY_INIT)
    model.save_pretrained(str(folder))
    # transformers 5.18 saves this composite's tracker weights under a doubled prefix
    # (tracker_model.tracker_model.*), which neither it nor Sam3TrackerModel reads back (94 weights "missing");
    # the layout they read, and facebook/sam3's, has one.
    weights = folder / "model.safetensors"
    tensors = {
        re.sub(r"^tracker_model\.tracker_model\.", "tracker_model.", k): v for k, v in load_file(weights).items()
    }
    save_file(tensors, str(weights), metadata={"format": "pt"})
    tiny_tokenizer().save_pretrained(str(folder))


def load_model(checkpoint: Path) -> Any:
    from transformers import Sam3Model

    roi_align.install()
    return Sam3Model.from_pretrained(str(checkpoint), local_files_only=True).eval()


def image_size(model: Any) -> int:
    return int(model.config.vision_config.backbone_config.image_size)


class VisionEncoder(nn.Module):
    """``pixel_values`` -> the ViT backbone's output as a ``[1, C, h, w]`` map (``Sam3VisionModel`` up to its neck)."""

    def __init__(self, model: Any):
        super().__init__()
        self.backbone = model.vision_encoder.backbone
        self.patch_size = model.config.vision_config.backbone_config.patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.backbone(pixel_values).last_hidden_state
        height, width = pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size
        return hidden_states.view(hidden_states.shape[0], height, width, -1).permute(0, 3, 1, 2)


class TextEncoder(nn.Module):
    """CLIP's text encoder and SAM 3's projection: ``Sam3Model.get_text_features(...).pooler_output``."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def vision_embeds(model: Any, backbone_features: torch.Tensor) -> Any:
    """The ``vision_embeds`` ``Sam3Model.forward`` takes: the vision neck on the cached backbone output."""
    from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

    fpn_hidden_states, fpn_position_encoding = model.vision_encoder.neck(backbone_features)
    return Sam3VisionEncoderOutput(fpn_hidden_states=fpn_hidden_states, fpn_position_encoding=fpn_position_encoding)


class Detector(nn.Module):
    """Everything after the two encoders: ``Sam3Model.forward`` itself, on cached image and phrase encodings."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, backbone_features, text_features, text_mask, input_boxes=None, input_boxes_labels=None):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        outputs = self.model(
            vision_embeds=vision_embeds(self.model, backbone_features),
            text_embeds=BaseModelOutputWithPooling(pooler_output=text_features),
            attention_mask=text_mask,
            input_boxes=input_boxes,
            input_boxes_labels=input_boxes_labels,
        )
        return tuple(getattr(outputs, name) for name in DETECTOR_OUTPUTS)


class TrackerEncoder(nn.Module):
    """``Sam3TrackerModel.get_image_embeddings`` from the backbone's output: the tracker's neck, the
    high-resolution projections of its decoder, the no-memory embedding on the neck's last level."""

    def __init__(self, tracker: Any):
        super().__init__()
        self.tracker = tracker

    def forward(self, backbone_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tracker = self.tracker
        levels = list(tracker.vision_encoder.neck(backbone_features)[0])
        levels[0] = tracker.mask_decoder.conv_s0(levels[0])
        levels[1] = tracker.mask_decoder.conv_s1(levels[1])
        levels[-1] = levels[-1] + tracker.no_memory_embedding.reshape(1, -1, 1, 1)
        high_0, high_1, embeddings = levels[: len(tracker.backbone_feature_sizes)]
        return embeddings, high_0, high_1


class ExemplarDetector(Detector):
    def forward(self, backbone_features, text_features, text_mask, input_boxes=None, input_boxes_labels=None):
        return super().forward(backbone_features, text_features, text_mask, input_boxes, input_boxes_labels)


def example_inputs(model: Any, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs for tracing and checking: a random image, a phrase's ids, two exemplar boxes (one negative)."""
    generator = torch.Generator().manual_seed(seed)
    size = image_size(model)
    vocab = int(model.config.text_config.vocab_size)
    ids = torch.full((1, TEXT_LENGTH), int(model.config.text_config.pad_token_id or 0), dtype=torch.int64)
    ids[0, :6] = torch.randint(0, vocab, (6,), generator=generator)
    mask = torch.zeros(1, TEXT_LENGTH, dtype=torch.int64)
    mask[0, :6] = 1
    return {
        "pixel_values": torch.randn(1, 3, size, size, generator=generator),
        "input_ids": ids,
        "attention_mask": mask,
        "input_boxes": torch.tensor([[[0.4, 0.45, 0.3, 0.2], [0.7, 0.3, 0.2, 0.3]]]),
        "input_boxes_labels": torch.tensor([[1, 0]]),
    }


def export(model: Any, out_dir: Path, opset: int = OPSET) -> dict[str, Path]:
    """Write the four graphs into ``out_dir``; return their paths by role."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {role: out_dir / f"{role}.onnx" for role in ("vision_encoder", "text_encoder", "detector")}
    paths["exemplar_detector"] = out_dir / "exemplar_detector.onnx"
    x = example_inputs(model)
    features = VisionEncoder(model)(x["pixel_values"])
    text = TextEncoder(model)(x["input_ids"], x["attention_mask"])
    text_axes = {1: "tokens"}
    boxes_axes = {1: "boxes"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values are expected here
        _export(
            VisionEncoder(model),
            (x["pixel_values"],),
            paths["vision_encoder"],
            ["pixel_values"],
            VISION_OUTPUTS,
            {},
            opset,
        )
        _export(
            TextEncoder(model),
            (x["input_ids"], x["attention_mask"]),
            paths["text_encoder"],
            ["input_ids", "attention_mask"],
            ["text_features"],
            {"input_ids": text_axes, "attention_mask": text_axes, "text_features": text_axes},
            opset,
        )
        detector_inputs = ["backbone_features", "text_features", "text_mask"]
        text_dynamic = {"text_features": text_axes, "text_mask": text_axes}
        _export(
            Detector(model),
            (features, text, x["attention_mask"]),
            paths["detector"],
            detector_inputs,
            DETECTOR_OUTPUTS,
            text_dynamic,
            opset,
        )
        _export(
            ExemplarDetector(model),
            (features, text, x["attention_mask"], x["input_boxes"], x["input_boxes_labels"]),
            paths["exemplar_detector"],
            [*detector_inputs, "input_boxes", "input_boxes_labels"],
            DETECTOR_OUTPUTS,
            {**text_dynamic, "input_boxes": boxes_axes, "input_boxes_labels": boxes_axes},
            opset,
        )
    return paths


def _export(module, args, path, inputs, outputs, axes, opset) -> None:
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=list(inputs),
        output_names=list(outputs),
        dynamic_axes=axes,
        opset_version=opset,
        dynamo=False,
    )


def check(model: Any, paths: dict[str, Path], atol: float = 1e-4) -> dict[str, float]:
    """Each graph in ONNX Runtime against PyTorch on the same inputs (one box, then two); seconds per part."""
    import onnxruntime as ort

    def session(role: str) -> Any:
        return ort.InferenceSession(str(paths[role]), providers=["CPUExecutionProvider"])

    x = example_inputs(model, seed=2)
    timings: dict[str, float] = {}

    def run(role: str, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
        started = time.perf_counter()
        got = session(role).run(None, {k: v.numpy() for k, v in feeds.items()})
        timings[role] = time.perf_counter() - started
        return got

    [features] = run("vision_encoder", {"pixel_values": x["pixel_values"]})
    np.testing.assert_allclose(features, VisionEncoder(model)(x["pixel_values"]).numpy(), atol=atol, rtol=1e-3)
    [text] = run("text_encoder", {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]})
    np.testing.assert_allclose(
        text, TextEncoder(model)(x["input_ids"], x["attention_mask"]).numpy(), atol=atol, rtol=1e-3
    )
    image = torch.from_numpy(features)
    common = {"backbone_features": image, "text_features": torch.from_numpy(text), "text_mask": x["attention_mask"]}
    for a, b in zip(run("detector", common), Detector(model)(image, torch.from_numpy(text), x["attention_mask"])):
        np.testing.assert_allclose(a, b.numpy(), atol=atol, rtol=1e-3)
    for boxes, labels in (
        (x["input_boxes"][:, :1], x["input_boxes_labels"][:, :1]),
        (x["input_boxes"], x["input_boxes_labels"]),
    ):
        want = ExemplarDetector(model)(image, torch.from_numpy(text), x["attention_mask"], boxes, labels)
        for a, b in zip(run("exemplar_detector", dict(common, input_boxes=boxes, input_boxes_labels=labels)), want):
            np.testing.assert_allclose(a, b.numpy(), atol=atol, rtol=1e-3)
    return timings


TRACKER_ROLES = ("tracker_encoder", "tracker_decoder")


def load_tracker(checkpoint: Path) -> tuple[Any | None, str]:
    """SAM 3's tracker from a ``sam3_video`` folder, or None and why not (a ``sam3`` folder has none; a folder
    whose tracker weights do not all load is not exported half-random)."""
    from transformers import Sam3TrackerModel

    if json.loads((checkpoint / "config.json").read_text()).get("model_type") != "sam3_video":
        return None, "the checkpoint is a sam3 image model, without SAM 3's tracker (facebook/sam3 has one)"
    tracker, info = Sam3TrackerModel.from_pretrained(str(checkpoint), local_files_only=True, output_loading_info=True)
    if info["missing_keys"]:
        return None, f"{len(info['missing_keys'])} of the tracker's weights are not in the checkpoint"
    return tracker.eval(), ""


def export_tracker(detector: Any, tracker: Any, out_dir: Path, opset: int) -> dict[str, Path]:
    from tools.sam_export import sam2

    paths = {role: out_dir / f"{role}.onnx" for role in TRACKER_ROLES}
    features = VisionEncoder(detector)(example_inputs(detector)["pixel_values"])
    encoder = TrackerEncoder(tracker).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _export(
            encoder,
            (features,),
            paths["tracker_encoder"],
            ["backbone_features"],
            ["image_embeddings", *sam2.HIGH_RES],
            {},
            opset,
        )
        _export(
            sam2.PromptDecoder(tracker).eval(),
            sam2.decoder_example(encoder(features), sam2.frame_size(tracker)),
            paths["tracker_decoder"],
            [*sam2.DECODER_INPUTS, *sam2.HIGH_RES],
            sam2.DECODER_OUTPUTS,
            sam2.DECODER_AXES,
            opset,
        )
    return paths


def check_tracker(detector: Any, tracker: Any, paths: dict[str, Path], atol: float = 1e-4) -> dict[str, float]:
    """The tracker's parts in ONNX Runtime against its own ``get_image_embeddings`` and ``forward``."""
    import onnxruntime as ort

    from tools.sam_export import sam2

    pixels = example_inputs(detector, seed=3)["pixel_values"]
    features = VisionEncoder(detector)(pixels)
    encoder = ort.InferenceSession(str(paths["tracker_encoder"]), providers=["CPUExecutionProvider"])
    started = time.perf_counter()
    encoded = encoder.run(None, {"backbone_features": features.numpy()})
    timings = {"tracker_encoder": time.perf_counter() - started}
    feats_0, feats_1, embeddings = tracker.get_image_embeddings(pixels)  # its own backbone: the detector's
    for got, want in zip(encoded, (embeddings, feats_0, feats_1)):
        np.testing.assert_allclose(got, want.numpy(), atol=atol, rtol=1e-3)
    encoded_torch = tuple(torch.from_numpy(a) for a in encoded)
    timings["tracker_decoder"] = sam2.check_decoder(paths["tracker_decoder"], tracker, encoded_torch, atol)
    return timings


def tokenizer_options(checkpoint: Path) -> dict[str, Any]:
    """What the service needs to tokenise as Sam3Processor does: the pad token's id and the padded length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    return {"pad_token_id": int(tokenizer.pad_token_id), "text_length": TEXT_LENGTH}


def export_checkpoint(checkpoint: Path, out_dir: Path, options: ExportOptions) -> Exported:
    # The tokenizer first: it is read in a moment, the weights may take a minute.
    try:
        tokenizing = tokenizer_options(checkpoint)
    except Exception as exc:  # transformers and tokenizers raise many kinds for a bad file
        raise load_error(checkpoint, exc, "the tokenizer (tokenizer.json, tokenizer_config.json)") from exc
    try:
        model = load_model(checkpoint)
    except Exception as exc:  # transformers and safetensors raise many kinds for a bad file
        raise load_error(checkpoint, exc) from exc
    paths = export(model, out_dir, options.opset)
    paths["tokenizer"] = out_dir / "tokenizer.json"
    shutil.copyfile(checkpoint / "tokenizer.json", paths["tokenizer"])
    json.loads(paths["tokenizer"].read_text())  # a truncated copy would fail here, not in a worker
    tracker, why_not = load_tracker(checkpoint)
    if tracker is not None:
        paths.update(export_tracker(model, tracker, out_dir, options.opset))
    else:
        print(f"sam3: no points/boxes/mask prompts: {why_not}", file=sys.stderr)
    timings = {}
    if options.check:
        # Checked against a fresh copy: tracing leaves the exported one's cached position encodings in a state
        # whose later eager runs differ (by up to 10% on the tiny model's masks) from a model never traced.
        fresh = load_model(checkpoint)
        timings = check(fresh, paths)
        if tracker is not None:
            timings.update(check_tracker(fresh, load_tracker(checkpoint)[0], paths))
    return Exported(
        adapter="models.adapters.sam3:Sam3Adapter",
        files=dict(paths),
        options={"image_size": image_size(model), **tokenizing},
        timings=timings,
        memory_mb=4096,
    )
