"""A tiny random SAM 3, saved as a hub download would look and exported by the real tool, once per session.

No SAM 3 weights can be downloaded here, so the tests build a randomly initialised
SAM 3 of the real architecture (a 2-layer ViT, a 2-layer CLIP text encoder, one-layer
DETR encoder and decoder, 20 queries) and a byte-level CLIP tokenizer with
``tools/export_sam.py --tiny-random --family sam3`` (which saves the checkpoint folder
first, then exports from it), run as a process as a user would run it. Needs the optional
extra (``requirements-sam.txt``: torch and transformers); ``make test`` installs it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, require

SAM3_MODEL = "sam3-tiny"
# The tiny model's candidates score 0.17-0.32 (random weights; SAM 3's default threshold, 0.3, would keep
# one or two): a lower threshold keeps several, so every comparison has instances to compare.
TINY_SCORE_THRESHOLD = 0.2


@dataclass(frozen=True)
class TinySam3:
    folder: Path  # the export (ONNX parts, tokenizer.json, manifest.toml)
    checkpoint: Path  # the transformers folder it was exported from
    export_log: str

    def entry(self) -> dict:
        """The tool's manifest entry, as written to manifest.toml."""
        return tomllib.loads((self.folder / "manifest.toml").read_text())["models"]["sam3"]

    def manifest(self, path: Path, routes: dict[str, str] | None = None, **overrides) -> Path:
        """A manifest serving text-regions (the default) and the export as ``sam3-tiny``: the tool's own
        entry (renamed), with ``overrides`` (``options``, ``fallback``, ``files``) merged in."""
        entry = (self.folder / "manifest.toml").read_text().replace("[models.sam3", f"[models.{SAM3_MODEL}")
        entry = entry.replace(
            "options = { ", f"options = {{ score_threshold = {TINY_SCORE_THRESHOLD}, ", 1
        )  # the tool's options, plus the tiny model's threshold
        lines = ['default = "text-regions"', ""]
        if routes:
            lines += ["[routes]", *(f'{k} = "{v}"' for k, v in routes.items()), ""]
        lines += [
            "[models.text-regions]",
            'version = "pp-ocrv4-det+rec"',
            'adapter = "models.adapters.text_regions:TextRegionsAdapter"',
            "",
        ]
        head, files = entry.split(f"[models.{SAM3_MODEL}.files]")
        for key, value in overrides.items():
            head = head.rstrip("\n") + f"\n{key} = {value}\n"
        path.write_text("\n".join(lines) + head + f"\n[models.{SAM3_MODEL}.files]" + files)
        return path


def require_sam_extra() -> None:
    for package in ("torch", "transformers", "onnx"):
        require(
            importlib.util.find_spec(package) is not None,
            f"{package} (the optional SAM extra: pip install -r requirements-sam.txt)",
        )


@pytest.fixture(scope="session")
def tiny_sam3(tmp_path_factory) -> TinySam3:
    require_sam_extra()
    folder = tmp_path_factory.mktemp("tiny-sam3")
    done = subprocess.run(
        [sys.executable, "tools/export_sam.py", "--tiny-random", "--family", "sam3", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ONNX Runtime matches PyTorch" in done.stderr  # the tool checked every part against torch
    return TinySam3(folder, folder / "checkpoint", done.stderr)
