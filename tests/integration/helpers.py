"""Small helpers the integration tests share."""

from __future__ import annotations

import io
import json
import time

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def submit(client, image: bytes, request: dict | None = None, filename: str = "upload.jpg"):
    data = {"image": (io.BytesIO(image), filename)}
    if request is not None:
        data["request"] = json.dumps(request)
    return client.post("/v1/jobs", data=data, content_type="multipart/form-data")


def run_to_end(client, image: bytes, request: dict | None = None, wait: int = 30, filename: str = "upload.jpg") -> dict:
    answer = submit(client, image, request, filename)
    assert answer.status_code in (200, 202), answer.get_json()
    job = answer.get_json()
    if job["status"] in ("queued", "running"):
        job = client.get(f"/v1/jobs/{job['id']}?wait={wait}").get_json()
    return job


def decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def small_png(seed: int = 0) -> bytes:
    """A 64x48 noise image: a quick job."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def wait_for(predicate, timeout: float, interval: float = 0.05):
    """``predicate()``'s first true value, polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"not true within {timeout} s")


def status(jobs, job_id: str) -> str:
    return str(jobs.get(job_id).status)
