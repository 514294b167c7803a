"""SAM 3's concept prompts: every instance of a phrase ("cup", "red car") and/or like some exemplar boxes.

Served from the ONNX parts ``tools/export_sam.py`` writes for a SAM 3 checkpoint
(tools/sam_export/sam3.py says what each takes and gives):

* ``vision_encoder``: the image, resized to ``image_size`` square (bilinear,
  the aspect ratio not kept, as Sam3ImageProcessor does), 0-1, normalised
  with ``pixel_mean``/``pixel_std`` -> the ViT backbone's features. Cached per image in
  the worker's encoder cache (and the tier every worker shares), like SAM's
  embeddings: another phrase on the same image skips it.
* ``text_encoder``: a phrase's token ids (``tokenizer``: the checkpoint's
  ``tokenizer.json``, read with the ``tokenizers`` package; padded with
  ``pad_token_id`` to ``text_length``) -> its features. Cached per phrase, so
  the same phrase on another image skips it.
* ``detector`` (a phrase) or ``exemplar_detector`` (a phrase and exemplar boxes;
  exemplars alone go with SAM 3's own placeholder phrase ``"visual"``) ->
  ``Q`` candidate masks, boxes and scores. A candidate is kept when
  ``sigmoid(logit) * sigmoid(presence)`` is above ``score_threshold``, as
  transformers' ``post_process_instance_segmentation`` keeps it; its mask is
  the sigmoid of its logits, resized to the image (bilinear) and above
  ``mask_threshold``; its box is the model's own (``Instance.box``).

Several phrases in one job are run one after the other on the one image
encoding; each instance is labelled with its phrase (``"exemplar"`` for
exemplars alone). Exemplars are ``(x0, y0, x1, y1, label)``: label 1 a positive
("like this"), 0 a negative ("not like this"), and apply to every phrase of
the job.

With ``tracker_encoder`` and ``tracker_decoder`` (exported from a
``sam3_video`` checkpoint such as ``facebook/sam3``) the model also takes one
object's ``points``, ``boxes`` and ``mask``, as SAM does: the tracker's encoder
runs on the *same* cached backbone features (no second backbone run), its
output is cached too, and its decoder is SAM 2's layout, served by a
:class:`models.adapters.sam.SamAdapter` held inside (``frame = "stretched"``).
A job may mix both kinds: the concept instances come first, then the
tracker's (labelled ``points``, ``box:<i>``, ``mask`` as SAM's). Without those
files such prompts are a ``422`` at submit (:meth:`Sam3Adapter.capabilities_with`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np
from PIL import Image
from pydantic import Field

from domain.errors import ModelError
from models.adapters.base import (
    AdapterContext,
    AdapterOptions,
    Capabilities,
    Instance,
    ModelAdapter,
    ModelSpec,
    Prompts,
    SegmentRequest,
)
from models.adapters.onnx import Session, create_session
from models.adapters.sam import EncodedImage, SamAdapter
from models.encoder_cache import EncoderPart, EncodingKey, EncodingSource, phrase_hash, pixels_hash

ROLES = ("vision_encoder", "text_encoder", "detector", "exemplar_detector", "tokenizer")
TRACKER_ROLES = ("tracker_encoder", "tracker_decoder")
CONCEPT_KINDS = frozenset({"text", "exemplars"})
CLICK_KINDS = frozenset({"points", "boxes", "mask"})  # one object's prompts: the tracker's
VISION_OUTPUTS = ("backbone_features",)
DETECTOR_OUTPUTS = ["pred_masks", "pred_boxes", "pred_logits", "presence_logits"]
EXEMPLAR_PHRASE = "visual"  # Sam3Processor's phrase for a prompt of boxes alone
EXEMPLAR_LABEL = "exemplar"


class Sam3Options(AdapterOptions):
    """A SAM 3 model's ``options`` in the manifest (the export tool writes the first three)."""

    image_size: int = Field(1008, gt=0)  # the square the image is resized to (facebook/sam3: 1008)
    pad_token_id: int = Field(49407, ge=0)  # CLIP's <|endoftext|>
    text_length: int = Field(32, gt=1)  # every phrase is padded (and cut) to this many tokens
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # on 0-1 RGB
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    score_threshold: float = Field(0.3, ge=0, le=1)  # transformers' post_process_instance_segmentation default
    mask_threshold: float = Field(0.5, ge=0, le=1)  # on the mask's probability
    max_instances: int = Field(100, ge=1)  # per phrase, best first
    # This process's encoder cache keeps up to this much of each part's outputs; 0: none here. One image is
    # ~111 MB of features for facebook/sam3 (float32), one phrase 32 KB.
    embedding_cache_mb: float = Field(512, ge=0)
    text_cache_mb: float = Field(16, ge=0)
    # The tracker (points, boxes, mask): SAM's options of the same names; its image encodings (21 MB each for
    # facebook/sam3) are cached apart from the backbone's.
    multimask: bool = False
    tracker_mask_threshold: float = 0.0  # on the tracker decoder's logits
    tracker_cache_mb: float = Field(256, ge=0)


@dataclass
class Sam3Item:
    """One request on its way through: its encodings where cached, else what the encoders take."""

    request: SegmentRequest
    image_key: EncodingKey
    concept: bool  # text or exemplars: the detector runs
    phrases: list[str]
    labels: list[str]
    text_keys: list[EncodingKey]
    boxes: np.ndarray | None  # [1, K, 4] cx, cy, w, h in 0-1
    box_labels: np.ndarray | None  # [1, K] int64
    features: dict[str, np.ndarray] | None = None
    pixel_values: np.ndarray | None = None
    texts: list[dict[str, np.ndarray] | None] = field(default_factory=list)
    # One object's points/boxes/mask, as the tracker (a SamAdapter) prepared them; None without such prompts.
    clicks: SegmentRequest | None = None
    tracker_items: list[EncodedImage] = field(default_factory=list)
    tracker_metas: list[dict[str, Any]] = field(default_factory=list)


class Sam3Adapter(ModelAdapter):
    """Open-vocabulary instance segmentation with SAM 3's concept prompts (see the module docstring)."""

    prompt_kinds = CONCEPT_KINDS | CLICK_KINDS
    requires_prompt = True
    Options = Sam3Options

    @classmethod
    def capabilities_with(cls, roles: frozenset[str]) -> Capabilities:
        """Points, boxes and a mask only with the tracker's two files."""
        kinds = cls.prompt_kinds if roles.issuperset(TRACKER_ROLES) else CONCEPT_KINDS
        return Capabilities(frozenset(kinds), cls.requires_prompt, cls.stacks_batches)

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.options = Sam3Options.model_validate(self.spec.options)
        self.image_cache: EncoderPart | None = None
        self.text_cache: EncoderPart | None = None
        self.tracker: SamAdapter | None = None

    def setup(self, context: AdapterContext) -> None:
        missing = [role for role in ROLES if role not in self.spec.files]
        if missing:
            raise ModelError(f"model {self.name}: the manifest gives no {', '.join(missing)} file")
        self._tokenizer = self._read_tokenizer(self.spec.files["tokenizer"])
        self._sessions = {
            role: create_session(self.spec.files[role], context.runtime) for role in ROLES if role != "tokenizer"
        }
        names = [o.name for o in self._sessions["vision_encoder"].get_outputs()]
        if tuple(names) != VISION_OUTPUTS:
            raise ModelError(f"model {self.name}: vision_encoder outputs {names}; expected {list(VISION_OUTPUTS)}")
        mb = 2**20
        self.image_cache = context.encoder_cache.part(
            self.part_digest("vision_encoder") + self._preprocessing(), int(self.options.embedding_cache_mb * mb)
        )
        # The phrase's features depend on the text encoder and on how the phrase is tokenised.
        self.text_cache = context.encoder_cache.part(
            "+".join([self.part_digest("text_encoder"), self.part_digest("tokenizer"), str(self.options.text_length)]),
            int(self.options.text_cache_mb * mb),
        )
        if all(role in self.spec.files for role in TRACKER_ROLES):
            self.tracker = SamAdapter(self._tracker_spec())
            self.tracker.setup(context)

    def _tracker_spec(self) -> ModelSpec:
        """The tracker as a SAM 2-style model: its encoder takes the backbone's features, not pixels."""
        roles = {"encoder": "tracker_encoder", "decoder": "tracker_decoder"}
        return replace(
            self.spec,
            adapter=f"{SamAdapter.__module__}:{SamAdapter.__name__}",
            files={role: self.spec.files[source] for role, source in roles.items()},
            sha256={role: self.spec.sha256[source] for role, source in roles.items() if source in self.spec.sha256},
            options={
                "frame": "stretched",
                "decoder_adds_padding_point": True,
                "image_size": self.options.image_size,
                "multimask": self.options.multimask,
                "mask_threshold": self.options.tracker_mask_threshold,
                "embedding_cache_mb": self.options.tracker_cache_mb,
            },
            capabilities=None,
        )

    def _read_tokenizer(self, path: str) -> Any:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises its own exception types for a missing or bad file
            raise ModelError(
                f"model {self.name}: its tokenizer file {path} is not a tokenizer.json the tokenizers package reads "
                f"({exc})"
            ) from exc
        pad = tokenizer.id_to_token(self.options.pad_token_id)
        if pad is None:
            raise ModelError(f"model {self.name}: pad_token_id {self.options.pad_token_id} is not in the tokenizer")
        tokenizer.enable_padding(length=self.options.text_length, pad_id=self.options.pad_token_id, pad_token=pad)
        tokenizer.enable_truncation(max_length=self.options.text_length)
        return tokenizer

    def _preprocessing(self) -> str:
        """What else, besides the encoder file, makes its input: kept apart from another model's entries."""
        o = self.options
        return f"+square-{o.image_size}+mean={list(o.pixel_mean)}+std={list(o.pixel_std)}".replace(" ", "")

    def execution_providers(self) -> list[str]:
        sessions = list(getattr(self, "_sessions", {}).values())
        found = {p for session in sessions for p in session.execution_providers}
        return sorted(found | set(self.tracker.execution_providers() if self.tracker is not None else ()))

    def cache_stats(self) -> dict[str, int] | None:
        return self.image_cache.stats() if self.image_cache is not None else None

    def _caches(self) -> tuple[EncoderPart, EncoderPart]:
        if self.image_cache is None or self.text_cache is None:
            raise ModelError(f"model {self.name}: used before its setup()")
        return self.image_cache, self.text_cache

    # --- preprocess ------------------------------------------------------------------

    def tokenize(self, phrase: str) -> dict[str, np.ndarray]:
        """``input_ids`` and ``attention_mask`` ``[1, text_length]`` int64, as Sam3Processor makes them."""
        encoding = self._tokenizer.encode(phrase)
        return {
            "input_ids": np.asarray([encoding.ids], dtype=np.int64),
            "attention_mask": np.asarray([encoding.attention_mask], dtype=np.int64),
        }

    def pixel_values(self, image: np.ndarray) -> np.ndarray:
        """The vision encoder's input: ``[1, 3, S, S]`` float32."""
        size = self.options.image_size
        resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
        mean = np.asarray(self.options.pixel_mean, dtype=np.float32)
        pixels = (resized / np.float32(255.0) - mean) / np.asarray(self.options.pixel_std, dtype=np.float32)
        return pixels.transpose(2, 0, 1)[np.newaxis].astype(np.float32)

    def preprocess(self, requests: Sequence[SegmentRequest]) -> tuple[list[Sam3Item], list[dict[str, Any]]]:
        images, texts = self._caches()
        items = []
        for request in requests:
            share = bool(request.image_id and request.scope)
            prompts = request.prompts
            concept = bool(prompts.text or prompts.exemplars)
            phrases = (list(prompts.text) or [EXEMPLAR_PHRASE]) if concept else []
            labels = (list(prompts.text) or [EXEMPLAR_LABEL]) if concept else []
            boxes, box_labels = self._exemplars(request)
            item = Sam3Item(
                request=request,
                image_key=images.key(request.scope, request.image_id or pixels_hash(request.image)),
                concept=concept,
                phrases=phrases,
                labels=labels,
                text_keys=[texts.key(request.scope, phrase_hash(p)) for p in phrases],
                boxes=boxes,
                box_labels=box_labels,
            )
            if prompts.points or prompts.boxes or prompts.mask is not None:
                self._prepare_clicks(item)
            item.features, source = images.lookup(item.image_key, share=share)
            request.report["embedding"] = {"cached": item.features is not None, "source": source}
            if item.features is None and (concept or any(t.encoding is None for t in item.tracker_items)):
                item.pixel_values = self.pixel_values(request.image)
            found = [texts.lookup(key, share=bool(request.scope)) for key in item.text_keys]
            item.texts = [arrays for arrays, _ in found]
            if concept:
                request.report["text_embedding"] = [
                    {"text": label, "cached": arrays is not None, "source": source}
                    for label, (arrays, source) in zip(labels, found)
                ]
            items.append(item)
        metas = [
            {"size": item.request.image.shape[:2], "labels": item.labels, "tracker": item.tracker_metas}
            for item in items
        ]
        return items, metas

    def _prepare_clicks(self, item: Sam3Item) -> None:
        """The tracker's share of the request: its points, boxes and mask, as a request of their own."""
        if self.tracker is None:
            raise ModelError(
                f"model {self.name}: points, boxes and masks need the tracker's files (a sam3_video export)"
            )
        request = item.request
        prompts = request.prompts
        item.clicks = replace(
            request,
            prompts=Prompts(points=prompts.points, boxes=prompts.boxes, mask=prompts.mask),
            report={},
            timings={},
        )
        item.tracker_items, item.tracker_metas = self.tracker.preprocess([item.clicks])
        for tracker_item in item.tracker_items:
            tracker_item.encoder_input = None  # the backbone's features go in (predict), not the pixels
        request.report["tracker_embedding"] = item.clicks.report["embedding"]

    @staticmethod
    def _exemplars(request: SegmentRequest) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Exemplar boxes as SAM 3 takes them: ``[1, K, 4]`` cx, cy, w, h over the image's size, labels ``[1, K]``."""
        exemplars = request.prompts.exemplars
        if not exemplars:
            return None, None
        height, width = request.image.shape[:2]
        corners = np.asarray([e[:4] for e in exemplars], dtype=np.float32) / np.asarray(
            [width, height, width, height], dtype=np.float32
        )
        centred = np.stack(
            [
                (corners[:, 0] + corners[:, 2]) / 2,
                (corners[:, 1] + corners[:, 3]) / 2,
                corners[:, 2] - corners[:, 0],
                corners[:, 3] - corners[:, 1],
            ],
            axis=1,
        )
        return centred[np.newaxis].astype(np.float32), np.asarray([[e[4] for e in exemplars]], dtype=np.int64)

    # --- ahead of prompts (POST /v1/images) ----------------------------------------------

    def warm(self, request: SegmentRequest) -> EncodingKey | None:
        """Encode the image alone, ahead of its prompts, into the backbone's cache entry (and the shared tier for an
        ``image_id`` and a ``scope``): a phrase, exemplars or a click on it then skips the backbone. The tracker's
        neck, a few convolutions, runs at the first click."""
        images, _ = self._caches()
        share = bool(request.image_id and request.scope)
        key = images.key(request.scope, request.image_id or pixels_hash(request.image))
        features, source = images.lookup(key, share=share)
        request.report["embedding"] = {"cached": features is not None, "source": source}
        if features is None:
            started = time.perf_counter()
            levels = self._run("vision_encoder", None, {"pixel_values": self.pixel_values(request.image)})
            request.timings["encode"] = time.perf_counter() - started
            images.store(key, dict(zip(VISION_OUTPUTS, levels)), share=share)
        elif source != EncodingSource.SHARED and share and images.cache.shared is not None:
            images.cache.shared.put(key, features)  # only this process held it: every worker should find it
        return key

    # --- predict (the only ONNX Runtime calls) -------------------------------------------

    def predict(self, items: list[Sam3Item]) -> list[tuple[list[list[np.ndarray]], Any]]:
        """Per request: per phrase, the detector's four outputs; and the tracker's decodings (None without clicks)."""
        images, texts = self._caches()
        results: list[tuple[list[list[np.ndarray]], Any]] = []
        for item in items:
            request = item.request
            if item.features is None and item.pixel_values is not None:
                started = time.perf_counter()
                levels = self._run("vision_encoder", None, {"pixel_values": item.pixel_values})
                request.timings["encode"] = time.perf_counter() - started
                item.features = dict(zip(VISION_OUTPUTS, levels))
                images.store(item.image_key, item.features, share=bool(request.image_id and request.scope))
            concept = [self._detect(item, i, texts) for i in range(len(item.phrases))]
            clicks = None
            if item.clicks is not None and self.tracker is not None:
                for tracker_item in item.tracker_items:
                    if tracker_item.encoding is None:
                        assert item.features is not None  # preprocess asked for the backbone's features
                        tracker_item.encoder_input = item.features["backbone_features"]
                clicks = self.tracker.predict(item.tracker_items)
                if "encode" in item.clicks.timings:
                    request.timings["encode_tracker"] = item.clicks.timings["encode"]
            results.append((concept, clicks))
        return results

    def _detect(self, item: Sam3Item, index: int, texts: EncoderPart) -> list[np.ndarray]:
        """The detector on the image's features and phrase ``index`` (its text encoder run unless cached)."""
        request = item.request
        assert item.features is not None
        tokens = self.tokenize(item.phrases[index])
        text = item.texts[index]
        if text is None:
            started = time.perf_counter()
            [features] = self._run("text_encoder", None, tokens)
            request.timings["encode_text"] = request.timings.get("encode_text", 0.0) + (time.perf_counter() - started)
            text = {"text_features": features}
            texts.store(item.text_keys[index], text, share=bool(request.scope))
        feeds = dict(item.features, text_features=text["text_features"], text_mask=tokens["attention_mask"])
        if item.boxes is not None and item.box_labels is not None:
            feeds.update(input_boxes=item.boxes, input_boxes_labels=item.box_labels)
            return self._run("exemplar_detector", DETECTOR_OUTPUTS, feeds)
        return self._run("detector", DETECTOR_OUTPUTS, feeds)

    def _run(self, role: str, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        session: Session = self._sessions[role]
        try:
            return session.run(outputs, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"model {self.name}: the {role} failed: {exc}") from exc

    # --- postprocess -----------------------------------------------------------------

    def postprocess(
        self, outputs: list[tuple[list[list[np.ndarray]], Any]], metas: list[dict[str, Any]]
    ) -> list[list[Instance]]:
        results = []
        for (concept, clicks), meta in zip(outputs, metas):
            instances = [
                instance
                for (masks, boxes, logits, presence), label in zip(concept, meta["labels"])
                for instance in self._instances(
                    masks[0], boxes[0], logits[0], presence.reshape(-1), label, meta["size"]
                )
            ]
            if clicks is not None and self.tracker is not None:
                instances += self.tracker.postprocess(clicks, meta["tracker"])[0]
            results.append(instances)
        return results

    def _instances(
        self,
        masks: np.ndarray,
        boxes: np.ndarray,
        logits: np.ndarray,
        presence: np.ndarray,
        label: str,
        size: tuple[int, int],
    ) -> list[Instance]:
        height, width = size
        scores = sigmoid(logits) * (sigmoid(presence[0]) if presence.size else 1.0)
        kept = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] > self.options.score_threshold]
        instances = []
        for i in kept[: self.options.max_instances]:
            probability = cv2.resize(
                sigmoid(masks[i]).astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR
            )
            x0, y0, x1, y1 = (float(v) for v in boxes[i] * np.asarray([width, height, width, height]))
            instances.append(
                Instance(
                    mask=probability > self.options.mask_threshold,
                    score=float(scores[i]),
                    label=label,
                    box=(x0, y0, x1, y1),
                )
            )
        return instances


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))
