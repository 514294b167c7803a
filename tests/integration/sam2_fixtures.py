"""A tiny random SAM 2, saved as a hub download would look and exported by the real tool, once per test module.

No SAM 2 weights can be downloaded here, so the tests build a randomly
initialised SAM 2 of the real architecture (a 5-block, 16-wide Hiera at the
real 1024 frame, the real neck, prompt encoder and mask decoder) with
``tools/export_sam.py --tiny-random --family sam2`` (which saves the checkpoint
folder first, then exports from it), run as a process as a user would run it.
Needs the optional extra (``requirements-sam.txt``: torch and transformers).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT, require

SAM2_MODEL = "sam2-tiny"


@dataclass(frozen=True)
class TinySam2:
    folder: Path  # the export (encoder.onnx, decoder.onnx, manifest.toml)
    checkpoint: Path  # the transformers folder it was exported from
    export_log: str
    export_s: float  # the tool's whole run as a process: build, save, load, export, check

    def entry(self) -> dict:
        """The tool's manifest entry, as written to manifest.toml."""
        return tomllib.loads((self.folder / "manifest.toml").read_text())["models"]["sam2"]

    def manifest(self, path: Path, **options) -> Path:
        """A manifest serving text-regions (the default) and the tool's entry, renamed ``sam2-tiny``, with
        ``options`` added to the tool's."""
        entry = (self.folder / "manifest.toml").read_text().replace("[models.sam2", f"[models.{SAM2_MODEL}")
        extra = "".join(f"{k} = {json.dumps(v)}, " for k, v in options.items())  # JSON scalars are TOML
        entry = entry.replace("options = { ", "options = { " + extra, 1)
        path.write_text(
            'default = "text-regions"\n\n'
            "[models.text-regions]\n"
            'version = "pp-ocrv4-det+rec"\n'
            'adapter = "models.adapters.text_regions:TextRegionsAdapter"\n\n' + entry
        )
        return path


def export_tiny_sam2(folder: Path) -> TinySam2:
    """Build, save and export the tiny SAM 2 into ``folder`` with the tool; skipped without the SAM extra."""
    for package in ("torch", "transformers", "onnx"):
        require(
            importlib.util.find_spec(package) is not None,
            f"{package} (the optional SAM extra: pip install -r requirements-sam.txt)",
        )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "tools/export_sam.py", "--tiny-random", "--family", "sam2", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ONNX Runtime matches PyTorch" in done.stderr  # the tool checked both graphs
    return TinySam2(folder, folder / "checkpoint", done.stderr, elapsed)
