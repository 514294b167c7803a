"""SAM 3's half-precision twins: made by tools/make_fp16.py, served with ``fp16 = true``, close to fp32.

On CPU here (CUDA is where fp16 pays; ``bench/device_check.py`` measures it there). The tiny random
SAM 3's mask probabilities all sit near 0.5 and its masks cover most of the image, so the union of
the served masks at the service's threshold agrees at IoU 1.0 whatever the precision: that proves
nothing. The comparison that can fail is per query, on the detector's raw outputs: each query's
mask thresholded at the median of its fp32 probabilities (half the image on each side, where a
0.0004 change of probability moves pixels), its score and its box. Measured here: IoU >= 0.995,
scores within 1e-4, boxes within 1e-3 of the image.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from domain.images import decode_image
from models.adapters.base import Prompts, RuntimeOptions, SegmentRequest
from models.adapters.onnx import create_session
from models.adapters.sam3 import Sam3Adapter, sigmoid
from models.catalog import ModelCatalog
from tests.conftest import PHOTOS, ROOT, require
from tests.integration.sam3_fixtures import SAM3_MODEL, TINY_SCORE_THRESHOLD
from workers.loaded_models import LoadedModels

PARTS = ("vision_encoder", "text_encoder", "detector", "exemplar_detector")

MEDIAN_MASK_IOU = 0.98  # measured 0.9956 at worst
SCORE_TOLERANCE = 2e-3  # measured 7e-5
BOX_TOLERANCE = 5e-3  # of the image's side; measured 7e-4
REQUESTS = [
    ("coffee.png", Prompts(text=("cup",))),
    ("coins.png", Prompts(text=("coin",))),
    ("rocket.jpg", Prompts(text=("rocket", "sky"))),
    ("coffee.png", Prompts(text=("cup",), exemplars=((200, 40, 380, 220, 1), (20, 300, 120, 390, 0)))),
]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def requests() -> list[SegmentRequest]:
    def pixels(name: str) -> np.ndarray:
        return decode_image((PHOTOS / name).read_bytes(), max_bytes=10**8, max_pixels=10**8).pixels

    return [SegmentRequest(pixels(name), prompts) for name, prompts in REQUESTS]


@pytest.fixture(scope="module")
def served(tiny_sam3, tmp_path_factory):
    """The fp32 and fp16 adapters, each as a worker loads it from its manifest; and the tool's output."""
    require(importlib.util.find_spec("onnx") is not None, "the onnx package, which tools/make_fp16.py needs")
    folder = tmp_path_factory.mktemp("sam3-fp16")
    parts = onnx_parts(tiny_sam3)
    manifests = {}
    for fp16 in (False, True):
        path = tiny_sam3.manifest(folder / f"models-{fp16}.toml", fp16=str(fp16).lower())
        # The files table is the manifest's last: the twins go at its end, where the tool will write them.
        twins = "".join(f'{part}_fp16 = "half/{part}_fp16.onnx"\n' for part in parts)
        path.write_text(path.read_text().rstrip("\n") + "\n" + twins)
        manifests[fp16] = path
    done = subprocess.run(
        [sys.executable, "tools/make_fp16.py", SAM3_MODEL, "--manifest", str(manifests[True])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    adapters = {}
    for fp16, path in manifests.items():
        models = LoadedModels(ModelCatalog.load(path), RuntimeOptions(intra_op_threads=2))
        models.load_all()  # verify_files (the sha256s that still apply), then setup, as a worker does
        assert not models.failures, models.failures
        adapters[fp16] = models.adapters[SAM3_MODEL]
    return adapters[False], adapters[True], done.stdout, folder


def onnx_parts(tiny_sam3) -> list[str]:
    """The export's ONNX roles (vision_encoder, text_encoder, detector, exemplar_detector, ...)."""
    return [role for role, path in tiny_sam3.entry()["files"].items() if path.endswith(".onnx")]


def test_the_tool_makes_a_twin_of_each_onnx_part_and_leaves_the_tokenizer_alone(served, tiny_sam3):
    full, half, stdout, folder = served
    parts = onnx_parts(tiny_sam3)
    assert {"vision_encoder", "text_encoder", "detector", "exemplar_detector"} <= set(parts)
    for part in parts:
        assert f"{part}: {part}.onnx -> {folder / 'half' / f'{part}_fp16.onnx'}" in stdout
    assert "tokenizer (tokenizer.json): not an ONNX graph; the fp16 model uses it as it is" in stdout
    assert "then set fp16 = true" in stdout
    assert half.spec.fp16 and {role: half.spec.files[role] for role in parts} == {
        part: str(folder / "half" / f"{part}_fp16.onnx") for part in parts
    }
    assert half.spec.files["tokenizer"] == full.spec.files["tokenizer"]
    assert set(half.spec.sha256) == {"tokenizer"}  # the fp32 parts' checksums do not apply to the twins
    assert isinstance(half, Sam3Adapter)


def test_fp16_sam3_finds_the_instances_fp32_finds_with_the_same_scores(served):
    full, half, _, _ = served
    for request in requests():
        a, b = full.segment([request])[0], half.segment([request])[0]
        assert a, "the tiny model kept no instance: the comparison would prove nothing"
        assert [i.label for i in a] == [i.label for i in b]
        np.testing.assert_allclose([i.score for i in a], [i.score for i in b], atol=SCORE_TOLERANCE)
        union_a, union_b = (np.logical_or.reduce([i.mask for i in found]) for found in (a, b))
        assert iou(union_a, union_b) >= 0.99  # true, and weak: these masks cover most of the image


def detector_outputs(
    adapter: Sam3Adapter, sessions: dict[str, Any], request: SegmentRequest
) -> list[dict[str, np.ndarray]]:
    """Per phrase, the (exemplar) detector's raw outputs on the adapter's files (``sessions``), each part run in
    turn on the encodings its own encoders gave, on the inputs the adapter makes (``bench/sam3_parts.py``)."""
    from bench.sam3_parts import part_feeds

    role = "exemplar_detector" if request.prompts.exemplars else "detector"
    out = []
    for phrase in request.prompts.text:
        feeds = part_feeds(adapter, sessions["vision_encoder"], request.image, phrase, request.prompts.exemplars)
        [feeds[role]["text_features"]] = sessions["text_encoder"].run(None, feeds["text_encoder"])
        session = sessions[role]
        wanted = {i.name for i in session.get_inputs()}
        names = [o.name for o in session.get_outputs()]
        out.append(dict(zip(names, session.run(None, {k: v for k, v in feeds[role].items() if k in wanted}))))
    return out


def test_fp16_sam3_gives_each_querys_mask_box_and_score_close_to_fp32(served):
    full, half, _, _ = served
    runtime = RuntimeOptions(intra_op_threads=2)
    sessions = [{part: create_session(a.spec.files[part], runtime) for part in PARTS} for a in (full, half)]
    worst = 1.0
    for request in requests():
        for a, b in zip(detector_outputs(full, sessions[0], request), detector_outputs(half, sessions[1], request)):
            np.testing.assert_allclose(a["pred_boxes"], b["pred_boxes"], atol=BOX_TOLERANCE)
            scores_a = sigmoid(a["pred_logits"][0]) * sigmoid(a["presence_logits"].reshape(-1)[0])
            scores_b = sigmoid(b["pred_logits"][0]) * sigmoid(b["presence_logits"].reshape(-1)[0])
            np.testing.assert_allclose(scores_a, scores_b, atol=SCORE_TOLERANCE)
            for mask_a, mask_b in zip(sigmoid(a["pred_masks"][0]), sigmoid(b["pred_masks"][0])):
                threshold = np.median(mask_a)
                worst = min(worst, iou(mask_a > threshold, mask_b > threshold))
    print(f"fp16 against fp32: per-query mask IoU at the median, worst {worst:.4f}")
    assert worst >= MEDIAN_MASK_IOU


def markdown_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """The ``### title`` Markdown tables ``bench.common.format_table`` printed, as rows by column name."""
    tables: dict[str, list[dict[str, str]]] = {}
    for section in text.split("### ")[1:]:
        title, *lines = section.splitlines()
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
        if rows:
            header, _, *body = rows
            tables[title.strip()] = [dict(zip(header, row)) for row in body]
    return tables


def test_the_device_check_measures_a_sam3_of_the_manifest_in_fp32_and_fp16_and_each_part(tiny_sam3, tmp_path):
    """On CPU (``--cpu-only``): the rows a GPU machine prints for CUDA and TensorRT, on the CPU provider."""
    from bench.sam3_parts import export_manifest

    require(importlib.util.find_spec("onnx") is not None, "the onnx package, which tools/make_fp16.py needs")
    export = tmp_path / "export"  # a copy: the check writes the fp16 twins beside the parts
    shutil.copytree(tiny_sam3.folder, export, ignore=shutil.ignore_patterns("checkpoint"))
    options = dict(tiny_sam3.entry()["options"], score_threshold=TINY_SCORE_THRESHOLD)
    manifest = export_manifest(export, "my-sam3", tmp_path / "models.toml", options=options)
    done = subprocess.run(
        [sys.executable, "-m", "bench.device_check", "--cpu-only", "--quick", "--repeats", "1"],
        cwd=ROOT,
        env={**os.environ, "MASKQ_MODELS_MANIFEST": str(manifest)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tables = markdown_tables(done.stdout)
    on_gpu = "no GPU to check here" not in done.stdout
    fp16 = "CUDA fp16" if on_gpu else "CPU fp16"
    provider = "CUDAExecutionProvider" if on_gpu else "CPUExecutionProvider"
    models = {r["variant"]: r for r in tables["models: CPU against CUDA and TensorRT"] if r["model"] == "my-sam3"}
    assert {"CPU fp32", fp16} <= set(models), done.stdout
    assert provider in models[fp16]["runs_on"]  # what the adapter says its sessions run on
    assert float(models[fp16]["mask_iou_min"]) >= 0.98  # against CPU fp32
    parts = {
        (r["variant"], r["part"]): r["runs_on"]
        for r in tables["SAM 3 parts alone (median of the runs after the first)"]
        if r["model"] == "my-sam3"
    }
    for part in PARTS:
        assert parts[("CPU fp32", part)] == "CPUExecutionProvider"
        assert parts[(fp16, part)].startswith(provider), parts
    assert "sam3-tiny" not in done.stdout  # the manifest has a SAM 3: no tiny one exported
    assert (export / "detector_fp16.onnx").is_file()  # made by tools/make_fp16.py's convert
