"""A test model whose inference asks for more memory than any machine has: a real MemoryError."""

from __future__ import annotations

import numpy as np

from models.adapters.base import AdapterOptions, ModelAdapter


class MemoryHogAdapter(ModelAdapter):
    """Allocates ``options.allocate_bytes`` in ``predict`` (default 100 TB), which fails for real."""

    prompt_kinds = frozenset({"points", "boxes", "text"})

    class Options(AdapterOptions):
        allocate_bytes: int = 10**14

    def setup(self, context):
        self.allocate = self.read_options().allocate_bytes

    def preprocess(self, requests):
        return [r.image for r in requests], [None for _ in requests]

    def predict(self, tensors):
        buffer = np.ones(self.allocate, dtype=np.uint8)
        return [buffer[:1] for _ in tensors]

    def postprocess(self, outputs, metas):
        return [[] for _ in outputs]
