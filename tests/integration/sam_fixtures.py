"""The tiny random SAM, exported to ONNX once per test session by the real export tool.

No SAM weights can be downloaded here, so the tests build a randomly
initialised SAM of the real architecture (a 2-layer ViT encoder, the real
prompt encoder and mask decoder) with ``tools/export_sam.py --tiny-random``,
run as a process as a user would run it. Needs the optional extra
(``requirements-sam.txt``: torch and transformers); ``make test`` installs it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, require

SAM_MODEL = "sam-tiny"


@dataclass(frozen=True)
class TinySam:
    """Where the exported tiny SAM lives."""

    folder: Path
    encoder: Path
    decoder: Path
    checkpoint: Path  # the Hugging Face folder it was exported from
    version: str = "tiny-random-0"

    def manifest(self, path: Path, **options) -> Path:
        """Write a model manifest serving text-regions (the default) and this SAM as ``sam-tiny``."""
        opts = {"multimask": False, "mask_threshold": 0.0, "embedding_cache_mb": 64, **options}
        rendered = ", ".join(f"{k} = {json.dumps(v)}" for k, v in opts.items())  # JSON scalars are TOML
        path.write_text(
            'default = "text-regions"\n\n'
            "[models.text-regions]\n"
            'version = "pp-ocrv4-det+rec"\n'
            'adapter = "models.adapters.text_regions:TextRegionsAdapter"\n\n'
            f"[models.{SAM_MODEL}]\n"
            f'version = "{self.version}"\n'
            'adapter = "models.adapters.sam:SamAdapter"\n'
            f'files = {{ encoder = "{self.encoder}", decoder = "{self.decoder}" }}\n'
            f"options = {{ {rendered} }}\n"
        )
        return path


@pytest.fixture(scope="session")
def tiny_sam(tmp_path_factory) -> TinySam:
    for package in ("torch", "transformers", "onnx"):
        require(
            importlib.util.find_spec(package) is not None,
            f"{package} (the optional SAM extra: pip install -r requirements-sam.txt)",
        )
    folder = tmp_path_factory.mktemp("tiny-sam")
    done = subprocess.run(
        [sys.executable, "tools/export_sam.py", "--tiny-random", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ONNX Runtime matches PyTorch" in done.stderr  # the tool checked both graphs
    return TinySam(folder, folder / "encoder.onnx", folder / "decoder.onnx", folder / "checkpoint")
