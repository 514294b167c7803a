"""Objects by name (issue 25) through the whole service: the detector, SAM per object, a second phrase.

The service as ``make run`` starts it (``ServiceStack``: embedded Redis, the
Procfile's ``celery worker``, gunicorn), result cache off, with
``config/models.toml``: ``objects`` is the pipeline ``coco-detector`` → ``sam``.
Each round sends ``tests/data/photos/coffee.png`` with one pixel changed, as
a JPEG (a new SHA-256: no cache has seen it), and runs four jobs on it, one
after another (``Prefer: wait=30``, one round trip each):

- **detector only**: ``model = "coco-detector"``, text ``cup`` (one box);
- **objects, first phrase**: text ``cup``, no model (text goes to ``objects``):
  the detector, SAM's image encoder, one decoder run;
- **objects, second phrase**: text ``dining table`` on the same photo: the
  embedding is cached (the job document says so; counted), so only the
  detector and one decoder run;
- **objects, two phrases**: ``cup`` and ``dining table``, cached: the
  detector and two decoder runs.

Each job's phases come from its document's ``metrics`` (``encode``: SAM's
encoder; ``predict``: the rest of the model's work, the detector and the
decoder runs). SAM's time per object is the two-phrase job's ``predict``
minus the second-phrase job's (one decoder run more; per round, median), and
``objects predict − detector predict`` per object as a cross-check. The
ratio second ÷ first is of p50 round trips measured in the same run.
"""

from __future__ import annotations

import io
import json
import statistics
import time

import numpy as np
import requests
from PIL import Image

from bench.common import ENDED, ROOT, Options, ServiceStack, percentile

PHOTO = ROOT / "tests" / "data" / "photos" / "coffee.png"
MAX_ROUNDS = 8

DETECTOR = "detector only (coco-detector, 'cup')"
FIRST = "objects 'cup', new photo (encoder runs)"
SECOND = "objects 'dining table', same photo (embedding cached)"
BOTH = "objects 'cup' + 'dining table', same photo (cached)"
JOBS = (
    ("detector", DETECTOR, {"model": "coco-detector", "prompts": {"text": ["cup"]}}),
    ("first", FIRST, {"prompts": {"text": ["cup"]}}),
    ("second", SECOND, {"prompts": {"text": ["dining table"]}}),
    ("both", BOTH, {"prompts": {"text": ["cup", "dining table"]}}),
)


def variant(data: bytes, seed: int) -> bytes:
    """The photo with one pixel changed, as a JPEG (quality 95): the same picture, a new image to every cache."""
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()
    pixels[0, seed % pixels.shape[1]] = (seed * 7) % 256
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def submit(session: requests.Session, base_url: str, data: bytes, request: dict) -> tuple[float, dict]:
    """One job, ``Prefer: wait=30`` (polled on if it has not ended); ``(round-trip seconds, its document)``."""
    files: dict[str, tuple[str | None, bytes | str, str]] = {
        "image": ("coffee.jpg", data, "image/jpeg"),
        "request": (None, json.dumps(request), "application/json"),
    }
    started = time.perf_counter()
    answer = session.post(f"{base_url}/v1/jobs", files=files, headers={"Prefer": "wait=30"}, timeout=60)
    if answer.status_code not in (200, 202):
        raise RuntimeError(f"POST /v1/jobs answered {answer.status_code}: {answer.text[:500]}")
    job = answer.json()
    while job["status"] not in ENDED:
        answer = session.get(f"{base_url}/v1/jobs/{job['id']}", params={"wait": 30}, timeout=60)
        answer.raise_for_status()
        job = answer.json()
    latency = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise RuntimeError(f"a job for {request} ended {job['status']}: {job}")
    return latency, job


def ms(values: list[float], q: float = 50) -> float:
    return round(percentile(values, q) * 1000, 1)


def run(options: Options) -> list[dict]:
    rounds = max(3, min(options.jobs, MAX_ROUNDS))
    warmup = min(options.warmup, 1)
    photo = PHOTO.read_bytes()
    seen: dict[str, dict[str, list]] = {key: {"rtt": [], "docs": []} for key, _, _ in JOBS}
    with ServiceStack(overrides={"result_cache_enabled": False}) as stack, requests.Session() as session:
        session.headers.update(stack.headers)
        for i in range(warmup + rounds):
            data = variant(photo, i)
            for key, _, request in JOBS:
                latency, job = submit(session, stack.base_url, data, request)
                if i >= warmup:
                    seen[key]["rtt"].append(latency)
                    seen[key]["docs"].append(job)

    def phase(key: str, name: str) -> list[float]:
        return [float((job.get("metrics") or {}).get(name, 0.0)) for job in seen[key]["docs"]]

    def objects(key: str) -> int:
        counts = {len(job["result"]["instances"]) for job in seen[key]["docs"]}
        if len(counts) != 1:
            raise RuntimeError(f"{key}: the rounds found different numbers of objects: {sorted(counts)}")
        return counts.pop()

    def skipped(key: str) -> str:
        docs = seen[key]["docs"]
        cached = sum(bool((job["result"].get("embedding") or {}).get("cached")) for job in docs)
        return f"{cached}/{len(docs)}"

    # One decoder run more: the two-phrase job's predict minus the second phrase's, per round.
    per_object = statistics.median(b - s for b, s in zip(phase("both", "predict"), phase("second", "predict")))
    detector_predict = percentile(phase("detector", "predict"), 50)
    rows = []
    for key, case, _ in JOBS:
        count = objects(key)
        row = {
            "case": case,
            "runs": len(seen[key]["rtt"]),
            "objects": count,
            "p50_ms": ms(seen[key]["rtt"]),
            "p95_ms": ms(seen[key]["rtt"], 95),
            "encode_p50_ms": ms(phase(key, "encode")),
            "predict_p50_ms": ms(phase(key, "predict")),
            "worker_p50_ms": ms(
                [
                    sum(phase(key, p)[n] for p in ("load", "encode", "predict", "store"))
                    for n in range(len(seen[key]["docs"]))
                ]
            ),
            "queue_p50_ms": ms(phase(key, "queue")),
        }
        if key != "detector":
            row["encoder_skipped"] = skipped(key)
            row["sam_ms_per_object"] = round(
                (percentile(phase(key, "predict"), 50) - detector_predict) * 1000 / max(count, 1), 1
            )
        if key == "second":
            row["second_over_first"] = round(
                percentile(seen["second"]["rtt"], 50) / percentile(seen["first"]["rtt"], 50), 3
            )
        if key == "both":
            row["one_more_object_ms"] = round(per_object * 1000, 1)
        rows.append(row)
    return rows


def summary(rows: list[dict]) -> list[str]:
    by_case = {row["case"]: row for row in rows}
    second, both = by_case[SECOND], by_case[BOTH]
    return [
        f"objects_detector_predict_p50_ms={by_case[DETECTOR]['predict_p50_ms']}",
        f"objects_second_phrase_over_first={second['second_over_first']} (encoder skipped {second['encoder_skipped']})",
        f"objects_sam_ms_per_object={both['one_more_object_ms']}",
    ]
