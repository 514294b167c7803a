"""Tiny adapters without ONNX Runtime, for tests of how workers load, swap and stand in models.

``options.fail_setup`` (a message) makes ``setup`` raise, as a broken model file would.
"""

from __future__ import annotations

import numpy as np

from models.adapters.base import AdapterOptions, Instance, ModelAdapter


class ToyOptions(AdapterOptions):
    fail_setup: str | None = None


class ToyAdapter(ModelAdapter):
    """One full-image instance labelled with the model's name and version."""

    prompt_kinds = frozenset({"text", "points", "boxes"})
    Options = ToyOptions

    def setup(self, context):
        if self.spec.options.get("fail_setup"):
            raise RuntimeError(self.spec.options["fail_setup"])
        self.runtime = context.runtime

    def preprocess(self, requests):
        return [r.image for r in requests], [None for _ in requests]

    def predict(self, tensors):
        return tensors

    def postprocess(self, outputs, metas):
        return [
            [Instance(mask=np.ones(o.shape[:2], bool), score=1.0, label=f"{self.name} {self.version}")] for o in outputs
        ]


class ToyBoxesAdapter(ToyAdapter):
    """Like :class:`ToyAdapter`, but takes box prompts only and needs one."""

    prompt_kinds = frozenset({"boxes"})
    requires_prompt = True
