"""Test adapters for pipelines (``steps``), without ONNX Runtime: a box detector and a box segmenter.

Each counts the "sessions" its set-up opens in :data:`SESSIONS` (by model
name), so a test can tell whether a pipeline opened sessions of its own or ran
on its steps' adapters.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from pydantic import Field

from models.adapters.base import AdapterOptions, Instance, ModelAdapter

DETECTOR = "tests.support.chain_models:BoxDetectorAdapter"
SEGMENTER = "tests.support.chain_models:BoxSegmenterAdapter"
SESSIONS: Counter[str] = Counter()  # model name -> sessions opened by its set-ups


def open_session(model: str) -> object:
    """What a real adapter's ``create_session`` call would be: counted."""
    SESSIONS[model] += 1
    return object()


class DetectorOptions(AdapterOptions):
    # [x0, y0, x1, y1] and the label of each object "found" in every image
    objects: list[tuple[float, float, float, float, str]] = Field(default_factory=list)


class BoxDetectorAdapter(ModelAdapter):
    """Finds the objects of ``options.objects``; a text prompt keeps those whose label contains it."""

    prompt_kinds = frozenset({"text"})
    stacks_batches = True
    Options = DetectorOptions

    def setup(self, context):
        self.session = open_session(self.name)
        self.objects = self.read_options().objects

    def segment(self, requests):
        results = []
        for request in requests:
            h, w = request.image.shape[:2]
            found = []
            for k, (x0, y0, x1, y1, label) in enumerate(self.objects):
                if request.prompts.text and not any(t in label for t in request.prompts.text):
                    continue
                mask = np.zeros((h, w), bool)
                mask[int(y0) : int(y1), int(x0) : int(x1)] = True
                found.append(Instance(mask=mask, score=0.9, label=label, object_id=k))
            results.append(found)
        return results


class BoxSegmenterAdapter(ModelAdapter):
    """One instance per box prompt: the box shrunk by one pixel each side, labelled ``box:<i>``, scored 0.5.

    ``options.per_box`` instances per box (the first is the box's; the others empty), as SAM's multimask does.
    """

    prompt_kinds = frozenset({"boxes", "points"})
    requires_prompt = True
    stacks_batches = True

    class Options(AdapterOptions):
        per_box: int = 1

    def setup(self, context):
        self.session = open_session(self.name)
        self.per_box = self.read_options().per_box
        self.calls = []

    def segment(self, requests):
        self.calls.append(len(requests))
        results = []
        for request in requests:
            h, w = request.image.shape[:2]
            out = []
            for i, (x0, y0, x1, y1) in enumerate(request.prompts.boxes):
                mask = np.zeros((h, w), bool)
                mask[int(y0) + 1 : int(y1) - 1, int(x0) + 1 : int(x1) - 1] = True
                out.append(Instance(mask=mask, score=0.5, label=f"box:{i}"))
                out += [Instance(mask=np.zeros((h, w), bool), score=0.1, label=f"box:{i}")] * (self.per_box - 1)
            request.report["segmenter"] = {"boxes": len(request.prompts.boxes)}
            results.append(out)
        return results
