"""Small helpers the integration tests share."""
from __future__ import annotations

import io
import json

import numpy as np
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
