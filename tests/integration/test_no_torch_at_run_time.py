"""What a deployment runs needs neither torch nor transformers: they are the export tool's, not the service's.

``lint-imports`` holds the service's own imports to that (the ``no-torch`` contract of
``.importlinter``); this holds what the libraries it calls import in turn, at run time: a fresh
process sets SAM 3 up on the tiny export and segments an image by a phrase (tokenised by the
``tokenizers`` package, every ONNX part run), then looks at what was imported.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT
from tests.integration.sam3_fixtures import TINY_SCORE_THRESHOLD

SCRIPT = """
import sys, tomllib
import numpy as np
from models.adapters.base import AdapterContext, ModelSpec, Prompts, SegmentRequest
from models.adapters.sam3 import Sam3Adapter

entry = tomllib.loads(open(sys.argv[1]).read())["models"]["sam3"]
options = dict(entry["options"], score_threshold={threshold})
spec = ModelSpec("sam3", entry["version"], entry["adapter"], files=entry["files"], options=options)
adapter = Sam3Adapter(spec)
adapter.setup(AdapterContext())
image = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
requests = [
    SegmentRequest(image, Prompts(text=("cup",))),
    SegmentRequest(image, Prompts(text=("cup",), exemplars=((10, 10, 80, 60, 1),))),
]
found = [adapter.segment([r])[0] for r in requests]
assert all(found), found  # instances: the detectors ran to the end
for name in ("torch", "transformers"):
    assert name not in sys.modules, sorted(m for m in sys.modules if m.split(".")[0] == name)[:5]
assert "tokenizers" in sys.modules and "onnxruntime" in sys.modules
print("instances", [len(f) for f in found])
"""


def test_sam3_sets_up_and_segments_a_phrase_without_importing_torch_or_transformers(tiny_sam3):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(threshold=TINY_SCORE_THRESHOLD), str(tiny_sam3.folder / "manifest.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("instances"), done.stdout
