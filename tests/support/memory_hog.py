"""A test model whose inference asks for more memory than any machine has: a real MemoryError."""
from __future__ import annotations

import numpy as np

from models.adapters.base import ModelAdapter


class MemoryHogAdapter(ModelAdapter):
    """Allocates ``options.allocate_bytes`` in ``predict`` (default 100 TB), which fails for real."""

    prompt_kinds = frozenset({"points", "boxes", "text"})

    def setup(self, runtime):
        self.allocate = int(self.spec.options.get("allocate_bytes", 10**14))

    def preprocess(self, requests):
        return [r.image for r in requests], [None for _ in requests]

    def predict(self, tensors):
        buffer = np.ones(self.allocate, dtype=np.uint8)
        return [buffer[:1] for _ in tensors]

    def postprocess(self, outputs, metas):
        return [[] for _ in outputs]
