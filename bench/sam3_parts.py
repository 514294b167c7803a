"""What each part of SAM 3 costs, and what the adapter's two caches save.

The tiny random SAM 3 (``tools/export_sam.py --tiny-random --family sam3``,
exported into a temporary folder; needs ``requirements-sam.txt``) and, when
``MASKQ_SAM3_DIR`` names a folder the tool exported a real checkpoint to, that
one too, each set up with the deployment's ONNX Runtime settings in this
process.

- **per part**: each ONNX part alone (a session of its own), on the inputs the
  adapter makes for one photo and one phrase: ``vision_encoder`` (the image),
  ``text_encoder`` (the phrase), ``detector`` (both encodings), and
  ``exemplar_detector`` (both and two exemplar boxes).
- **through the adapter** (``adapter.segment``: preprocess, predict,
  postprocess; both caches on), each round: a first phrase on a new image (all
  three parts), a second phrase on that image (the image encoding cached: no
  vision encoder), the first phrase on another new image (the phrase cached: no
  text encoder), and that request again (both cached: the detector alone). Each
  case's ``report`` is checked to be what its name says.

``vs_first`` = a row's median ÷ the median of the first case, in the same run.
The tiny model's parts are all small (a 2-layer ViT on 224 px), so its ratios
say little about facebook/sam3, whose 1008 px ViT-H is most of the work: run it
with ``MASKQ_SAM3_DIR`` for those.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, Options, percentile
from config.settings import load_settings
from domain.images import decode_image
from models.adapters.base import AdapterContext, ModelSpec, Prompts, RuntimeOptions, SegmentRequest
from models.adapters.onnx import create_session
from models.catalog import ModelCatalog
from models.manifest import import_adapter

PHOTO = ROOT / "tests" / "data" / "photos" / "coffee.png"
EXEMPLARS = ((200, 40, 380, 220, 1), (20, 300, 120, 390, 0))  # a cup (like this), the table (not this)
PARTS = ("vision_encoder", "text_encoder", "detector", "exemplar_detector")
FIRST = "first phrase, new image (all parts)"
SECOND_PHRASE = "second phrase, same image (no vision encoder)"
SAME_PHRASE = "same phrase, new image (no text encoder)"
BOTH_CACHED = "both cached (detector only)"
MAX_ROUNDS = 20
REAL_ROUNDS = 5  # facebook/sam3's vision encoder takes seconds per image on a CPU
TINY_SCORE_THRESHOLD = 0.2  # the tiny model's candidates score 0.17-0.32 (tests/integration/sam3_fixtures.py)


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, numbers, booleans: JSON's spelling is TOML's


def export_manifest(export_dir: Path, name: str, out: Path, **overrides: Any) -> Path:
    """A manifest serving the export in ``export_dir`` (its ``manifest.toml``, written by the tool) as ``name``,
    its files where they are now; ``overrides`` replace fields of the entry (``options``, ``fp16``)."""
    [entry] = tomllib.loads((export_dir / "manifest.toml").read_text())["models"].values()
    files = {role: str(export_dir / Path(path).name) for role, path in entry.pop("files").items()}
    entry.update(overrides)
    lines = [f"default = {toml_value(name)}", "", f"[models.{name}]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in entry.items()]
    lines += ["", f"[models.{name}.files]", *(f"{role} = {toml_value(path)}" for role, path in files.items())]
    out.write_text("\n".join(lines) + "\n")
    return out


def export_tiny_sam3(folder: Path) -> Path:
    """Export the tiny random SAM 3 into ``folder``; the manifest serving it as ``sam3-tiny``."""
    subprocess.run(
        [sys.executable, "tools/export_sam.py", "--tiny-random", "--family", "sam3", "--no-check", str(folder)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    [entry] = tomllib.loads((folder / "manifest.toml").read_text())["models"].values()
    options = dict(entry["options"], score_threshold=TINY_SCORE_THRESHOLD)
    return export_manifest(folder, "sam3-tiny", folder / "bench-models.toml", options=options)


def can_export() -> bool:
    """Whether the export tool's extra (torch, transformers, onnx) is installed here."""
    return all(importlib.util.find_spec(package) is not None for package in ("torch", "transformers", "onnx"))


def photo() -> np.ndarray:
    return decode_image(PHOTO.read_bytes(), max_bytes=10**8, max_pixels=10**8).pixels


def part_feeds(
    adapter: Any, vision: Any, image: np.ndarray, phrase: str, exemplars: Sequence[Sequence[float]] = EXEMPLARS
) -> dict[str, dict[str, np.ndarray]]:
    """Each part's inputs, as the adapter makes them for ``image``, ``phrase`` and ``exemplars`` (``(x0, y0, x1,
    y1, label)``); the vision encoder (``vision``, a session) runs once here, the text encoder's output is the
    caller's to add (``text_features``)."""
    tokens = adapter.tokenize(phrase)
    pixels = {"pixel_values": adapter.pixel_values(image)}
    features = dict(zip([o.name for o in vision.get_outputs()], vision.run(None, pixels)))
    feeds = {
        "vision_encoder": pixels,
        "text_encoder": tokens,
        "detector": dict(features, text_mask=tokens["attention_mask"]),
    }
    if exemplars:  # cx, cy, w, h over the image's size, as the adapter gives them
        height, width = image.shape[:2]
        corners = np.asarray([e[:4] for e in exemplars], dtype=np.float32) / np.asarray([width, height] * 2, np.float32)
        centred = np.stack(
            [
                (corners[:, 0] + corners[:, 2]) / 2,
                (corners[:, 1] + corners[:, 3]) / 2,
                corners[:, 2] - corners[:, 0],
                corners[:, 3] - corners[:, 1],
            ],
            axis=1,
        )
        feeds["exemplar_detector"] = dict(
            features,
            text_mask=tokens["attention_mask"],
            input_boxes=centred[np.newaxis].astype(np.float32),
            input_boxes_labels=np.asarray([[e[4] for e in exemplars]], dtype=np.int64),
        )
    return feeds


def part_timings(
    spec: ModelSpec, runtime: RuntimeOptions, image: np.ndarray, rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """Seconds of each part's runs alone (its own session on ``runtime``), the first run of each not counted;
    and the providers each session runs on (``bench/device_check.py`` shows them)."""
    adapter = import_adapter(spec.adapter)(spec)
    adapter.setup(AdapterContext(runtime))
    sessions = {part: create_session(spec.files[part], runtime) for part in PARTS}
    feeds = part_feeds(adapter, sessions["vision_encoder"], image, "cup")
    [text_features] = sessions["text_encoder"].run(None, feeds["text_encoder"])
    for part in ("detector", "exemplar_detector"):
        feeds[part]["text_features"] = text_features
    timings: dict[str, list[float]] = {part: [] for part in PARTS}
    for _ in range(rounds + 1):
        for part in PARTS:  # interleaved, so drift hits every part alike
            session = sessions[part]
            wanted = {i.name for i in session.get_inputs()}
            started = time.perf_counter()
            session.run(None, {k: v for k, v in feeds[part].items() if k in wanted})
            timings[part].append(time.perf_counter() - started)
    providers = {part: list(session.execution_providers) for part, session in sessions.items()}
    return {part: seconds[1:] for part, seconds in timings.items()}, providers


def adapter_timings(spec: ModelSpec, runtime: RuntimeOptions, image: np.ndarray, rounds: int) -> dict[str, list]:
    """Seconds of ``adapter.segment`` for the four cases (module docstring), each checked against its report."""
    adapter = import_adapter(spec.adapter)(spec)
    adapter.setup(AdapterContext(runtime))
    cases: dict[str, list[float]] = {FIRST: [], SECOND_PHRASE: [], SAME_PHRASE: [], BOTH_CACHED: []}
    expected = {  # (image encoding cached, phrase encoding cached)
        FIRST: (False, False),
        SECOND_PHRASE: (True, False),
        SAME_PHRASE: (False, True),
        BOTH_CACHED: (True, True),
    }
    for i in range(rounds + 1):  # round 0 warms the sessions up; not counted
        first, other = uuid.uuid4().hex, uuid.uuid4().hex
        phrase = f"cup {uuid.uuid4().hex[:6]}"  # a phrase no earlier round encoded
        for case, image_id, text in (
            (FIRST, first, phrase),
            (SECOND_PHRASE, first, f"saucer {i}"),
            (SAME_PHRASE, other, phrase),
            (BOTH_CACHED, other, phrase),
        ):
            request = SegmentRequest(image, Prompts(text=(text,)), image_id=image_id)
            started = time.perf_counter()
            adapter.segment([request])
            elapsed = time.perf_counter() - started
            got = (request.report["embedding"]["cached"], request.report["text_embedding"][0]["cached"])
            assert got == expected[case], f"{case}: the caches said {got}"
            if i:
                cases[case].append(elapsed)
    return cases


def timing_row(model: str, case: str, seconds: list[float], first_p50: float) -> dict:
    p50 = percentile(seconds, 50)
    return {
        "model": model,
        "case": case,
        "runs": len(seconds),
        "p50_ms": round(p50 * 1000, 1),
        "p95_ms": round(percentile(seconds, 95) * 1000, 1),
        "vs_first": round(p50 / first_p50, 3),
    }


def measure(name: str, spec: ModelSpec, runtime: RuntimeOptions, rounds: int) -> list[dict]:
    image = photo()
    cases = adapter_timings(spec, runtime, image, rounds)
    parts, _ = part_timings(spec, runtime, image, rounds)
    first = percentile(cases[FIRST], 50)
    rows = [timing_row(name, f"part: {part}", seconds, first) for part, seconds in parts.items()]
    rows += [timing_row(name, case, seconds, first) for case, seconds in cases.items()]
    return rows


def run(options: Options) -> list[dict]:
    settings = load_settings()
    runtime = RuntimeOptions.from_settings(settings)
    rounds = max(1, min(options.jobs, MAX_ROUNDS))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="maskq-bench-sam3-") as folder:
        if can_export():
            manifest = export_tiny_sam3(Path(folder))
            rows += measure("sam3-tiny", ModelCatalog.load(manifest).spec("sam3-tiny"), runtime, rounds)
        else:  # a real export (below) needs neither
            rows.append({"model": "sam3-tiny", "case": "not measured: torch and transformers (requirements-sam.txt)"})
        real = os.environ.get("MASKQ_SAM3_DIR")
        if real:
            manifest = export_manifest(Path(real), "sam3", Path(folder) / "real-models.toml")
            rows += measure("sam3", ModelCatalog.load(manifest).spec("sam3"), runtime, min(rounds, REAL_ROUNDS))
    return rows


def summary(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        if "vs_first" in row and row["case"] in (SECOND_PHRASE, SAME_PHRASE, BOTH_CACHED):
            key = {SECOND_PHRASE: "second_phrase", SAME_PHRASE: "same_phrase", BOTH_CACHED: "both_cached"}[row["case"]]
            out.append(f"{row['model'].replace('-', '_')}_{key}_over_first={row['vs_first']}")
    return out


if __name__ == "__main__":
    from bench.common import format_table

    print(format_table("sam3_parts", run(Options())))
