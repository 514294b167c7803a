"""The real text-regions model, with two test hooks for manifest reload tests.

- Each image's result gets one more instance, labelled ``served-by <version>``,
  written by the adapter object that ran the job: a result says which loaded
  version computed it, independently of what the job record claims.
- ``options.hold_until`` (a file path) makes ``predict`` wait until that file
  exists (30 s at most), so a test can keep a job in flight, inside the model,
  for as long as it needs and then let it go.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from models.adapters.base import Instance
from models.adapters.text_regions import TextRegionsAdapter, TextRegionsOptions


class VersionStampAdapter(TextRegionsAdapter):
    """Text regions plus a ``served-by <version>`` instance; optionally held in ``predict``."""

    class Options(TextRegionsOptions):
        hold_until: str | None = None

    def predict(self, tensors):
        hold = self.spec.options.get("hold_until")
        if hold:
            deadline = time.monotonic() + 30
            while not Path(hold).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return super().predict(tensors)

    def postprocess(self, outputs, metas):
        results = super().postprocess(outputs, metas)
        for instances, meta in zip(results, metas):
            stamp = np.zeros((meta["height"], meta["width"]), dtype=bool)
            stamp[0, 0] = True
            instances.append(Instance(mask=stamp, score=1.0, label=f"served-by {self.version}"))
        return results
