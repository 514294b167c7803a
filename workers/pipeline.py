"""One job through a model: stored input in, stored result out."""
from __future__ import annotations

import json
import time

import cv2
import numpy as np

from domain.errors import InputLost
from domain.keys import job_prefix
from storage import Storage
from workers import metrics
from domain import masks
from domain.images import decode_image
from domain.records import JobRecord
from domain.schemas import JobRequest
from models.adapters.base import Instance, ModelAdapter, Prompts, SegmentRequest


def to_prompts(request: JobRequest) -> Prompts:
    p = request.prompts
    return Prompts(
        text=tuple(p.text),
        points=tuple((float(x), float(y), int(label)) for x, y, label in p.points),
        boxes=tuple(tuple(float(v) for v in box) for box in p.boxes),
        mask=masks.decode(p.mask.model_dump()) if p.mask else None,
    )


def load_request(record: JobRecord, storage: Storage, max_bytes: int, max_pixels: int) -> tuple[SegmentRequest, JobRequest]:
    request = JobRequest.model_validate(record.request)
    try:
        data = storage.get(record.input_key)
    except KeyError:
        raise InputLost(f"the job's input {record.input_key} is no longer in storage") from None
    image = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    options = {"points_per_side": request.points_per_side} if request.points_per_side is not None else {}
    return SegmentRequest(image=image.pixels, prompts=to_prompts(request), image_id=record.image_sha256,
                          scope=record.tenant, options=options), request


def store_result(
    record: JobRecord, request: JobRequest, image: np.ndarray, instances: list[Instance], storage: Storage,
    report: dict | None = None,
) -> str:
    """Write ``result.json`` (and a PNG per mask if asked); return the result's key.

    ``report`` is what the adapter noted about the run (``SegmentRequest.report``): kept in the result.

    Keys depend only on the job id, so a job run twice overwrites its own
    files and never leaves a second result behind.
    """
    prefix = job_prefix(record.tenant, record.id)
    height, width = image.shape[:2]
    out = []
    for i, instance in enumerate(instances):
        rle = masks.encode(instance.mask)
        bbox, area = masks.describe(rle)
        item = {"bbox": bbox, "area": area, "score": round(float(instance.score), 4), "label": instance.label}
        if "rle" in request.outputs:
            item["mask"] = rle
        if "polygon" in request.outputs:
            item["polygon"] = polygons(instance.mask)
        if "png" in request.outputs:
            item["png_key"] = f"{prefix}masks/{i}.png"
            storage.put(item["png_key"], masks.to_png(instance.mask), "image/png")
        out.append(item)
    result = {"width": width, "height": height, "instances": out, **(report or {})}
    key = f"{prefix}result.json"
    storage.put(key, json.dumps(result).encode(), "application/json")
    return key


def count_model_work(model: str, seconds: float, report: dict) -> None:
    """This worker's series (workers/metrics.py): the model's time, and where a SAM embedding came from."""
    series = metrics.series()
    series.inference.labels(model).observe(seconds)
    embedding = report.get("embedding")
    if embedding is not None:
        result = {"this worker": "local", "shared": "shared"}.get(embedding.get("source"), "miss")
        series.embeddings.labels(model, result).inc()


def discard_result(record: JobRecord, storage: Storage) -> None:
    """Delete what a job wrote besides its input (its result and masks)."""
    prefix = job_prefix(record.tenant, record.id)
    for key in storage.list(prefix):
        if key != record.input_key:
            storage.delete(key)


def polygons(mask: np.ndarray) -> list[list[float]]:
    """The outer contours of a mask as flat ``[x0, y0, x1, y1, ...]`` lists (COCO's polygon form)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def run(record: JobRecord, adapter: ModelAdapter, storage: Storage, max_bytes: int,
        max_pixels: int) -> tuple[str, int, dict[str, float]]:
    """Segment one job's image; return ``(result_key, instance count, seconds per phase)``.

    The phases: ``load`` (the input from storage, decoded), ``encode`` (an adapter's image encoder, as it
    reports in ``SegmentRequest.timings``; SAM-family models), ``predict`` (the rest of the model's work),
    ``store`` (the result and masks written).
    """
    started = time.perf_counter()
    segment_request, request = load_request(record, storage, max_bytes, max_pixels)
    loaded = time.perf_counter()
    instances = adapter.segment([segment_request])[0]
    segmented = time.perf_counter()
    key = store_result(record, request, segment_request.image, instances, storage, segment_request.report)
    encode = segment_request.timings.get("encode", 0.0)
    timings = {"load": loaded - started, "predict": segmented - loaded - encode, "store": time.perf_counter() - segmented}
    count_model_work(adapter.name, segmented - loaded, segment_request.report)
    if "encode" in segment_request.timings:
        timings["encode"] = encode
    return key, len(instances), {phase: round(s, 4) for phase, s in timings.items()}
