"""What every family's export shares: the tool's options, what an export wrote, and its manifest entry."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ExportOptions:
    """The command line's choices that every family reads."""

    opset: int = 17
    check: bool = True  # run each ONNX part in ONNX Runtime against PyTorch on the same inputs
    encoder_input: str = "normalized"  # SAM only: see tools/sam_export/sam.py


@dataclass
class Exported:
    """What one export wrote: the model's files by role, its adapter and options, and what each part cost."""

    adapter: str
    files: dict[str, Path]
    options: dict[str, Any] = field(default_factory=dict)
    # Seconds per part of one ONNX Runtime run on the check's inputs (empty without the check).
    timings: dict[str, float] = field(default_factory=dict)
    memory_mb: int = 1024


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def toml_value(value: Any) -> str:
    """A TOML value for a string, number, bool or list of them (JSON's spelling is TOML's for these)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def manifest_entry(name: str, version: str, exported: Exported) -> str:
    """The ``[models.NAME]`` table that serves the export with no code change (absolute paths, pinned sha256)."""
    lines = [
        f"[models.{name}]",
        f"version = {toml_value(version)}",
        f"adapter = {toml_value(exported.adapter)}",
        f"memory_mb = {exported.memory_mb}",
    ]
    if exported.options:
        lines.append(f"options = {toml_value(exported.options)}")
    lines.append(f"sha256 = {toml_value({role: sha256(path) for role, path in exported.files.items()})}")
    lines.append("")
    lines.append(f"[models.{name}.files]")
    lines += [f"{role} = {toml_value(str(path.resolve()))}" for role, path in exported.files.items()]
    return "\n".join(lines) + "\n"
