"""Hostile and heavy batch uploads over HTTP (issue 22, findings 1-3): refused early, held one image at a time."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import struct
import tarfile
import threading
import time
import tracemalloc
import zipfile

import numpy as np
from PIL import Image
from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart

from tests.integration.test_batches import TEXT, post_batch


def header(name: str, size: int = 0) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.GNU_FORMAT)


def noise_png(seed: int, side: int = 360) -> bytes:
    """About 390 kB that PNG cannot shrink: under werkzeug's 500 kB, so it would be kept in memory."""
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=1)
    return out.getvalue()


def test_hostile_archives_get_a_clear_4xx_at_once_and_leave_no_batch(isolated):
    client = isolated.client()
    # 382 bytes in the issue; here 300 one-megabyte bzip2 streams after the header: 14 kB, 300 MB inflated.
    bomb = bz2.compress(header("notes.bin", 300 * 2**20)) + bz2.compress(bytes(2**20)) * 300
    many = gzip.compress((header("._x") + header("d/")) * 50_000 + bytes(1024), compresslevel=1)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for n in range(3):
            archive.writestr(f"{n}.jpg", b"")
    forged = bytearray(out.getvalue())
    struct.pack_into("<HH", forged, len(forged) - 22 + 8, 1, 1)  # the end record counts 1 entry of 3
    for name, blob, code, says in (
        ("bomb.tar.bz2", bomb, 413, "MASKQ_MAX_BATCH_BYTES"),
        ("many.tar.gz", many, 413, "20000 members"),
        ("forged.zip", bytes(forged), 400, "more entries than the 1"),
    ):
        started = time.perf_counter()
        answer = post_batch(client, archive=(name, blob))
        assert answer.status_code == code and says in answer.get_json()["detail"], (name, answer.get_json())
        assert time.perf_counter() - started < 2, name
    assert not list(isolated.redis.scan_iter(match="maskq:batch:*"))
    assert not list(isolated.redis.scan_iter(match="maskq:job:*"))


def file(blob: bytes, name: str) -> FileStorage:
    return FileStorage(io.BytesIO(blob), name)


def peak_memory_of(client, parts: dict) -> tuple[object, int]:
    """Post a batch whose body was encoded beforehand; the answer and the peak of Python memory meanwhile."""
    boundary, body = encode_multipart(parts)
    stream = io.BytesIO(body)
    tracemalloc.start()
    try:
        answer = client.post(
            "/v1/batches",
            input_stream=stream,
            content_length=len(body),
            content_type=f"multipart/form-data; boundary={boundary}",
        )
        return answer, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_big_batch_is_held_one_image_at_a_time(isolated):
    client = isolated.client()
    assert post_batch(client, [("warm.png", noise_png(99, 32))]).status_code == 202  # imports, connections
    images = {f"{n}.png": noise_png(n) for n in range(40)}
    one = max(len(blob) for blob in images.values())
    total = sum(len(blob) for blob in images.values())
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        for name, blob in images.items():
            archive.writestr(f"zipped/{name}", blob)
    uploads = {
        "parts": {"request": json.dumps(TEXT), "images": [file(b, n) for n, b in images.items()]},
        "archive": {"request": json.dumps(TEXT), "archive": file(zipped.getvalue(), "all.zip")},
    }
    for kind, parts in uploads.items():
        answer, peak = peak_memory_of(client, parts)
        assert answer.status_code == 202 and answer.get_json()["total"] == 40, answer.get_json()
        # All of them at once (as before) would be 16 MB; what remains is one image: its bytes, its pixels, the
        # copy stored, and the jobs' bookkeeping (about 3.7 images' worth here).
        assert peak < 6 * one < total / 6, (kind, peak, one)


class GatedBody(io.BytesIO):
    """A request body that arrives only when the test says so (a slow uploader)."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.reading, self.go = threading.Event(), threading.Event()

    def readinto(self, buffer):  # (what werkzeug reads a body with)
        self.reading.set()
        assert self.go.wait(30)
        return super().readinto(buffer)


def test_batch_uploads_past_the_process_bound_get_a_503_before_their_body_is_read(isolated):
    client = isolated.client(max_concurrent_batch_uploads=1)
    boundary, body = encode_multipart({"request": json.dumps(TEXT), "images": [file(noise_png(1, 64), "a.png")]})
    headers = {"content_type": f"multipart/form-data; boundary={boundary}", "content_length": len(body)}
    slow = GatedBody(body)
    answers = {}
    uploader = threading.Thread(
        target=lambda: answers.update(slow=client.post("/v1/batches", input_stream=slow, **headers))
    )
    uploader.start()
    try:
        assert slow.reading.wait(10)  # the first upload holds the one slot, its body still coming
        second = GatedBody(body)
        second.go.set()
        refused = client.post("/v1/batches", input_stream=second, **headers)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert "batch uploads" in refused.get_json()["detail"]
        assert second.tell() == 0  # not a byte of it was read
    finally:
        slow.go.set()
        uploader.join(30)
    assert answers["slow"].status_code == 202
    again = client.post("/v1/batches", input_stream=io.BytesIO(body), **headers)
    assert again.status_code == 202  # the slot was given back
