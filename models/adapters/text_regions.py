"""The bundled "text-regions" model: PP-OCRv4 text detection and recognition.

The ONNX files and the pure pre/post-processing helpers come from the
``rapidocr-onnxruntime`` wheel; the parameters follow its ``config.yaml``.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field

from domain.errors import ModelError
from models.adapters.base import (
    AdapterContext,
    AdapterOptions,
    Instance,
    ModelAdapter,
    ModelSpec,
    Prompts,
    SegmentRequest,
)
from models.adapters.onnx import create_session


class TextRegionsOptions(AdapterOptions):
    """The text-regions model's ``options`` in the manifest: rapidocr 1.4.4's config.yaml (Global, Det, Rec)."""

    limit_side_len: int = Field(736, gt=0)
    max_side_len: int = Field(2000, gt=0)
    # The enlargement to limit_side_len stops here: without it a 1x1 or 2x300 upload becomes a
    # 736 x 43000 detector input (6 GB, a minute). 6016 keeps every real page and strip as rapidocr has it.
    max_input_side: int = Field(6016, gt=0)
    thresh: float = 0.3
    box_thresh: float = 0.5
    max_candidates: int = Field(1000, gt=0)
    unclip_ratio: float = 1.6
    use_dilation: bool = True
    score_mode: Literal["fast", "slow"] = "fast"
    rec_img_shape: tuple[int, int, int] = (3, 48, 320)
    rec_batch_num: int = Field(6, gt=0)
    text_score: float = 0.5
    min_height: int = 30
    width_height_ratio: float = 8


DEFAULT_OPTIONS: dict[str, Any] = TextRegionsOptions().model_dump()
BOX_MIN_FRACTION = 0.5  # share of a region's mask that must lie inside a box prompt
LINE_TOLERANCE = 10  # px: boxes whose tops differ by less are on one line (as rapidocr sorts)


@dataclass
class TextRegion:
    """One detected and recognised text region, in original-image pixels."""

    polygon: np.ndarray  # (4, 2) float32, clockwise from the top-left corner
    det_score: float
    text: str
    rec_score: float


def _package_dir() -> Path:
    # find_spec on a top-level package locates it without running its __init__,
    # which would import onnxruntime and build rapidocr's own sessions' machinery.
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("rapidocr-onnxruntime is not installed; the text-regions model ships in it")
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_model_files() -> dict[str, str]:
    """The detector and recogniser ONNX files shipped in the rapidocr-onnxruntime wheel."""
    models = _package_dir() / "models"
    return {
        "detector": str(models / "ch_PP-OCRv4_det_infer.onnx"),
        "recognizer": str(models / "ch_PP-OCRv4_rec_infer.onnx"),
    }


@functools.cache
def _rapidocr_helper(relative: str) -> Any:
    """Load one of rapidocr's self-contained helper modules straight from its file.

    A normal import of ``rapidocr_onnxruntime.x.utils`` runs the package's
    ``__init__`` (the whole RapidOCR pipeline, onnxruntime and yaml included).
    """
    path = _package_dir() / relative
    spec = importlib.util.spec_from_file_location(f"_maskq_rapidocr_{path.parent.name}", path)
    if spec is None or spec.loader is None:
        raise ModelError(f"rapidocr's helper {path} cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- prompt matching (pure) ---------------------------------------------------------


def normalize_text(text: str) -> str:
    """NFKC, casefolded, without any whitespace: what a user's text prompt is compared as."""
    return "".join(unicodedata.normalize("NFKC", text).casefold().split())


def match_text(label: str | None, prompt: str) -> bool:
    """Whether ``prompt`` occurs in ``label`` once both are normalised.

    A prompt that normalises to nothing matches nothing rather than everything.
    """
    needle = normalize_text(prompt)
    return bool(needle) and label is not None and needle in normalize_text(label)


def mask_contains_point(mask: np.ndarray, x: float, y: float) -> bool:
    """Whether the pixel holding point (x, y) is set; points off the image are in no mask."""
    col, row = math.floor(x), math.floor(y)
    return 0 <= row < mask.shape[0] and 0 <= col < mask.shape[1] and bool(mask[row, col])


def box_coverage(mask: np.ndarray, box: Sequence[float]) -> float:
    """Share of the mask's pixels whose centres lie inside ``box`` (x0, y0, x1, y1)."""
    area = int(np.count_nonzero(mask))
    if area == 0:
        return 0.0
    x0, x1 = sorted(box[0::2])
    y0, y1 = sorted(box[1::2])
    # Pixel c spans [c, c+1); its centre c + 0.5 is inside when x0 <= c + 0.5 < x1.
    c0, c1 = (max(0, math.ceil(v - 0.5)) for v in (x0, x1))
    r0, r1 = (max(0, math.ceil(v - 0.5)) for v in (y0, y1))
    return int(np.count_nonzero(mask[r0:r1, c0:c1])) / area


def filter_by_text(instances: list[Instance], texts: Sequence[str]) -> list[Instance]:
    return [i for i in instances if any(match_text(i.label, t) for t in texts)]


def filter_by_points(instances: list[Instance], points: Sequence[tuple[float, float, int]]) -> list[Instance]:
    """Keep regions holding any foreground point (all, if none given), minus those holding a background one."""
    positives = [(x, y) for x, y, label in points if label == 1]
    negatives = [(x, y) for x, y, label in points if label == 0]
    return [
        i
        for i in instances
        if (not positives or any(mask_contains_point(i.mask, x, y) for x, y in positives))
        and not any(mask_contains_point(i.mask, x, y) for x, y in negatives)
    ]


def filter_by_boxes(
    instances: list[Instance], boxes: Sequence[Sequence[float]], min_fraction: float = BOX_MIN_FRACTION
) -> list[Instance]:
    return [i for i in instances if any(box_coverage(i.mask, b) >= min_fraction for b in boxes)]


def apply_prompts(instances: list[Instance], prompts: Prompts) -> list[Instance]:
    """Narrow ``instances`` by every prompt kind given (AND across kinds, OR within one)."""
    if prompts.text:
        instances = filter_by_text(instances, prompts.text)
    if prompts.points:
        instances = filter_by_points(instances, prompts.points)
    if prompts.boxes:
        instances = filter_by_boxes(instances, prompts.boxes)
    return instances


def reading_order(polygons: Sequence[np.ndarray], tolerance: float = LINE_TOLERANCE) -> list[int]:
    """Indices of ``polygons`` top-to-bottom, then left-to-right within a line (rapidocr's sorted_boxes)."""
    order = sorted(range(len(polygons)), key=lambda k: (polygons[k][0][1], polygons[k][0][0]))
    for i in range(len(order) - 1):
        for j in range(i, -1, -1):
            a, b = polygons[order[j]][0], polygons[order[j + 1]][0]
            if abs(b[1] - a[1]) < tolerance and b[0] < a[0]:
                order[j], order[j + 1] = order[j + 1], order[j]
            else:
                break
    return order


# --- geometry helpers -----------------------------------------------------------------


def _order_clockwise(points: np.ndarray) -> np.ndarray:
    """tl, tr, br, bl (the order the crop and rapidocr's filter_tag_det_res expect)."""
    by_x = points[np.argsort(points[:, 0])]
    tl, bl = by_x[:2][np.argsort(by_x[:2, 1])]
    tr, br = by_x[2:][np.argsort(by_x[2:, 1])]
    return np.array([tl, tr, br, bl], dtype=np.float32)


def _rotate_crop(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Perspective-crop a quadrilateral to an upright strip (rapidocr's get_rotate_crop_image)."""
    width = int(max(np.linalg.norm(points[0] - points[1]), np.linalg.norm(points[2] - points[3])))
    height = int(max(np.linalg.norm(points[0] - points[3]), np.linalg.norm(points[1] - points[2])))
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(points, target)
    crop = cv2.warpPerspective(image, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
    # A tall strip is most likely vertical text; the recogniser only reads horizontal lines.
    return np.rot90(crop) if crop.shape[0] / crop.shape[1] >= 1.5 else crop


class TextRegionsAdapter(ModelAdapter):
    """Segments an image's text regions and labels each with the text read in it.

    PP-OCRv4 detection (DB) gives quadrilaterals; each is cropped upright and
    read by the CTC recogniser; regions read with a score under ``text_score``
    are dropped, as rapidocr does. The angle classifier is not used. Each
    instance's mask is its filled quadrilateral, its score the detector's box
    score and its label the recognised text. ``spec.files`` may name other
    "detector"/"recognizer" files; ``spec.options`` may override
    :data:`DEFAULT_OPTIONS`.
    """

    prompt_kinds = frozenset({"text", "points", "boxes"})
    Options = TextRegionsOptions

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.options = self.read_options().model_dump()

    def setup(self, context: AdapterContext) -> None:
        files = {**bundled_model_files(), **self.spec.files}
        self._det = create_session(files["detector"], context.runtime)
        self._rec = create_session(files["recognizer"], context.runtime)
        # rapidocr 1.4.4 stores the recogniser's alphabet in the model's metadata.
        characters = self._rec.get_modelmeta().custom_metadata_map.get("character")
        if characters is None and "keys" not in files:
            raise ModelError(f"{files['recognizer']} has no 'character' metadata and no keys file is given")
        opt = self.options
        db_module = _rapidocr_helper("ch_ppocr_det/utils.py")
        self._db_postprocess = db_module.DBPostProcess(
            thresh=opt["thresh"],
            box_thresh=opt["box_thresh"],
            max_candidates=opt["max_candidates"],
            unclip_ratio=opt["unclip_ratio"],
            score_mode=opt["score_mode"],
            use_dilation=opt["use_dilation"],
        )
        ctc_module = _rapidocr_helper("ch_ppocr_rec/utils.py")
        self._ctc_decode = ctc_module.CTCLabelDecode(
            character=characters.splitlines() if characters is not None else None,
            character_path=None if characters is not None else files["keys"],
        )

    def preprocess(self, requests: Sequence[SegmentRequest]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        tensors, metas = [], []
        opt = self.options
        for request in requests:
            # The models were trained on BGR images (PaddleOCR reads with cv2).
            bgr = np.ascontiguousarray(request.image[:, :, ::-1])
            h, w = bgr.shape[:2]
            # Very flat or very wide images get black bands above and below, as rapidocr
            # does, so the detector does not see text squeezed to a few rows.
            pad = 0
            if h <= opt["min_height"] or w / h > opt["width_height_ratio"]:
                pad = abs(max(int(w / opt["width_height_ratio"]), opt["min_height"]) * 2 - h) // 2
            padded = cv2.copyMakeBorder(bgr, pad, pad, 0, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0)) if pad else bgr
            ph, pw = padded.shape[:2]
            # rapidocr's order: shrink the image to max_side_len, then enlarge it until its
            # short side reaches limit_side_len. With the letterbox this bounds the input to
            # about max(2000 x 2000, 5888 x 736). Capping the detector input's long side at
            # 2000 instead halves the time on wide text strips but merges words and drops spaces.
            ratio = max(min(1.0, opt["max_side_len"] / max(ph, pw)), opt["limit_side_len"] / min(ph, pw))
            ratio = min(ratio, opt["max_input_side"] / max(ph, pw))
            size = tuple(max(32, round(v * ratio / 32) * 32) for v in (pw, ph))
            resized = cv2.resize(padded, size)
            tensor = ((resized.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[np.newaxis]
            tensors.append(
                {"det_input": np.ascontiguousarray(tensor), "image": bgr, "pad_top": pad, "padded_shape": (ph, pw)}
            )
            # Boxes leave predict in original pixels already, so postprocess needs no scales.
            metas.append({"height": h, "width": w, "prompts": request.prompts})
        return tensors, metas

    def predict(self, tensors: list[dict[str, Any]]) -> list[list[TextRegion]]:
        det_input = self._det.get_inputs()[0].name
        polygons_per_image, det_scores_per_image, texts_per_image = [], [], []
        for item in tensors:
            pred = self._det.run(None, {det_input: item["det_input"]})[0]
            if pred.ndim != 4 or pred.shape[1] != 1:
                raise ModelError(f"text detector returned shape {pred.shape}, expected (1, 1, H, W)")
            boxes, scores = self._db_postprocess(pred, item["padded_shape"])
            h, w = item["image"].shape[:2]
            kept: list[tuple[np.ndarray, float]] = []
            for box, score in zip(boxes, scores):
                box = _order_clockwise(box.astype(np.float32) - (0, item["pad_top"]))
                box[:, 0] = np.clip(box[:, 0], 0, w - 1)
                box[:, 1] = np.clip(box[:, 1], 0, h - 1)
                if np.linalg.norm(box[0] - box[1]) <= 3 or np.linalg.norm(box[0] - box[3]) <= 3:
                    continue  # rapidocr's filter_tag_det_res: too thin to read
                kept.append((box, float(score)))
            kept = [kept[k] for k in reading_order([box for box, _ in kept])]
            polygons_per_image.append([box for box, _ in kept])
            det_scores_per_image.append([score for _, score in kept])
            # Each image's crops are read on their own: padded to one width with another image's crops,
            # the recogniser reads some lines differently, and a job's result would depend on its batch.
            texts_per_image.append(self._recognize([_rotate_crop(item["image"], box) for box, _ in kept]))
        return [
            [TextRegion(box, score, *text) for box, score, text in zip(polygons, scores, texts)]
            for polygons, scores, texts in zip(polygons_per_image, det_scores_per_image, texts_per_image)
        ]

    def _recognize(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        """(text, score) per crop; crops of similar aspect share a batch so little is padding."""
        channels, height, min_width = self.options["rec_img_shape"]
        batch_size = self.options["rec_batch_num"]
        rec_input = self._rec.get_inputs()[0].name
        order = np.argsort([c.shape[1] / c.shape[0] for c in crops])
        results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        for start in range(0, len(crops), batch_size):
            indices = order[start : start + batch_size]
            max_ratio = max([min_width / height] + [crops[i].shape[1] / crops[i].shape[0] for i in indices])
            width = int(height * max_ratio)
            batch = np.zeros((len(indices), channels, height, width), dtype=np.float32)
            for row, i in enumerate(indices):
                crop = crops[i]
                resized_w = min(width, math.ceil(height * crop.shape[1] / crop.shape[0]))
                resized = cv2.resize(crop, (resized_w, height)).astype(np.float32)
                batch[row, :, :, :resized_w] = ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
            decoded = self._ctc_decode(self._rec.run(None, {rec_input: batch})[0])
            for i, (text, score) in zip(indices, decoded):
                results[i] = (text, float(score))
        return results

    def postprocess(self, outputs: list[list[TextRegion]], metas: list[dict[str, Any]]) -> list[list[Instance]]:
        results = []
        for regions, meta in zip(outputs, metas):
            instances = []
            for region in regions:
                if region.rec_score < self.options["text_score"]:
                    continue  # rapidocr's filter_result; an empty read scores 0 and goes too
                mask = np.zeros((meta["height"], meta["width"]), dtype=np.uint8)
                cv2.fillPoly(mask, [np.round(region.polygon).astype(np.int32)], 1)
                instances.append(Instance(mask=mask.astype(bool), score=region.det_score, label=region.text))
            results.append(apply_prompts(instances, meta["prompts"]))
        return results
