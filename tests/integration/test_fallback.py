"""Models that cannot load (a broken file, a missing provider) in a real worker: fallback, or a clear failure."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from models.adapters.text_regions import bundled_model_files
from tests.conftest import image_bytes
from tests.integration.helpers import run_to_end, wait_for

TEXT = "models.adapters.text_regions:TextRegionsAdapter"


def missing_provider() -> str:
    """An onnxruntime provider this machine's build lacks (CUDA on a CPU-only machine)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return next(
        p
        for p in (
            "CUDAExecutionProvider",
            "TensorrtExecutionProvider",
            "ROCMExecutionProvider",
            "CoreMLExecutionProvider",
        )
        if p not in available
    )


def small_png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def write(path: Path, text: str) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def models_by_name(client) -> dict[str, dict]:
    return {m["name"]: m for m in client.get("/v1/models").get_json()["models"]}


def test_jobs_of_a_model_that_cannot_load_run_on_its_fallback_or_fail_with_code_model_and_the_worker_stays_up(
    isolated, tmp_path
):
    garbage = tmp_path / "detector.onnx"
    garbage.write_bytes(b"not an ONNX model at all " * 64)
    provider = missing_provider()
    manifest = write(
        tmp_path / "models.toml",
        (
            'default = "text-regions"\n'
            f'[models.text-regions]\nversion = "pp1"\nadapter = "{TEXT}"\n'
            f'[models.broken]\nversion = "b1"\nadapter = "{TEXT}"\nfiles = {{ detector = "detector.onnx" }}\n'
            'fallback = "text-regions"\n'
            f'[models.broken-alone]\nversion = "a1"\nadapter = "{TEXT}"\nfiles = {{ detector = "detector.onnx" }}\n'
            f'[models.gpu-only]\nversion = "g1"\nadapter = "{TEXT}"\nproviders = ["{provider}"]\n'
            'fallback = "text-regions"\n'
        ),
    )
    worker = isolated.worker(MASKQ_MODELS_MANIFEST=manifest)
    pool = set(worker.children())
    client = isolated.client(models_manifest=manifest)
    photo = image_bytes("en.jpg")

    reference = run_to_end(client, photo)
    assert reference["status"] == "succeeded" and reference["degraded"] is False and "model_used" not in reference

    degraded = run_to_end(client, photo, {"model": "broken"})
    assert degraded["status"] == "succeeded"
    assert degraded["model"] == {"name": "broken", "version": "b1"}
    assert degraded["degraded"] is True and degraded["model_used"] == {"name": "text-regions", "version": "pp1"}
    assert "model 'broken' version b1 failed to load" in degraded["degraded_reason"]
    assert "INVALID_PROTOBUF" in degraded["degraded_reason"]
    # The fallback really ran: the same regions as the fallback model's own job.
    assert [i["label"] for i in degraded["result"]["instances"]] == [
        i["label"] for i in reference["result"]["instances"]
    ]

    on_cpu = run_to_end(client, small_png(2), {"model": "gpu-only"})
    assert on_cpu["status"] == "succeeded" and on_cpu["degraded"] is True
    assert on_cpu["model_used"]["name"] == "text-regions" and provider in on_cpu["degraded_reason"]

    failed = run_to_end(client, small_png(), {"model": "broken-alone"})
    assert failed["status"] == "failed" and failed["error"]["code"] == "model"
    message = failed["error"]["message"]
    assert "model 'broken-alone' version a1 failed to load" in message and "INVALID_PROTOBUF" in message
    assert "it has no fallback" in message

    assert run_to_end(client, small_png(1))["status"] == "succeeded"
    assert worker.alive and set(worker.children()) == pool  # nothing crashed or was replaced
    models = models_by_name(client)
    assert models["text-regions"]["loaded"] is True and "error" not in models["text-regions"]
    for name in ("broken", "broken-alone"):
        assert models[name]["loaded"] is False and "INVALID_PROTOBUF" in models[name]["error"]
        assert str(garbage) in models[name]["error"]
    assert models["gpu-only"]["loaded"] is False and provider in models["gpu-only"]["error"]
    assert models["broken"]["fallback"] == "text-regions" and models["broken-alone"]["fallback"] is None


def test_a_model_repaired_in_the_manifest_loads_without_a_restart_and_its_jobs_are_no_longer_degraded(
    isolated, tmp_path
):
    (tmp_path / "detector.onnx").write_bytes(b"\x00" * 512)
    body = (
        'default = "text-regions"\n'
        f'[models.text-regions]\nversion = "pp1"\nadapter = "{TEXT}"\n'
        f'[models.ocr]\nversion = "%s"\nadapter = "{TEXT}"\nfiles = {{ detector = "%s" }}\n'
        'fallback = "text-regions"\n'
    )
    manifest = write(tmp_path / "models.toml", body % ("1", "detector.onnx"))
    worker = isolated.worker(MASKQ_MODELS_MANIFEST=manifest, MASKQ_MANIFEST_CHECK_S=0.1)
    client = isolated.client(models_manifest=manifest, manifest_check_s=0.1)
    assert run_to_end(client, small_png(), {"model": "ocr"})["degraded"] is True

    shutil.copy(bundled_model_files()["detector"], tmp_path / "detector-2.onnx")
    write(manifest, body % ("2", "detector-2.onnx"))
    wait_for(lambda: models_by_name(client)["ocr"]["loaded"], 20)
    assert "error" not in models_by_name(client)["ocr"]
    job = run_to_end(client, small_png(1), {"model": "ocr"})
    assert job["status"] == "succeeded" and job["degraded"] is False and job["model"]["version"] == "2"
    assert worker.alive
