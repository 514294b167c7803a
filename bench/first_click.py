"""The first click (issue 27), through the whole service: upload-and-click against ``POST /v1/images`` then click.

The service is started as ``make run`` starts it (embedded Redis, gunicorn, the
Procfile's ``celery worker``), with ``config/models.toml`` (SAM for points) and
the result cache off. Each round takes a photo no cache has seen (one pixel
changed, sent as a JPEG: a new SHA-256) twice over, one copy per path:

- *upload and click*: ``POST /v1/jobs`` (multipart: the image and a point) with
  ``Prefer: wait=30``, one round trip: the encoder and the decoder run;
- *POST /v1/images, then click*: the upload (timed), the wait until
  ``GET /v1/images/{id}`` says ``ready`` (the user looking at the image: not
  part of the click), then the click, ``POST /v1/jobs`` with
  ``{"image_id": ...}`` and the same point, ``Prefer: wait=30``.

``click_over_upload_and_click`` is the p50 click after ``POST /v1/images``
over the p50 upload-and-click (the target: at most 0.15); ``encoder_skipped``
counts the clicks whose job says its embedding was cached. Also: a click sent
right after the upload, before the encoding is ready (it queues behind the
encode on the one worker, so it costs about what is left of the encode).
"""

from __future__ import annotations

import json
import time

import requests

from bench.common import Options, ServiceStack, percentile
from bench.sam_interactive import CLICKS, PHOTOS, timing_row, variant

MAX_ROUNDS = 15
UPLOAD_AND_CLICK = "upload and click (POST /v1/jobs, multipart, Prefer: wait)"
STORE = "POST /v1/images (store, encode queued)"
READY = "POST /v1/images until encoding ready"
CLICK = "click after POST /v1/images (image_id, Prefer: wait)"
EARLY = "click right after POST /v1/images (encode not ready yet)"


def upload_and_click(session: requests.Session, base_url: str, data: bytes, point) -> tuple[float, dict]:
    request = json.dumps({"prompts": {"points": [[point[0], point[1], 1]]}, "lane": "interactive"})
    files: dict[str, tuple[str | None, bytes | str, str]] = {
        "image": ("photo.jpg", data, "image/jpeg"),
        "request": (None, request, "application/json"),
    }
    started = time.perf_counter()
    answer = session.post(f"{base_url}/v1/jobs", files=files, headers={"Prefer": "wait=30"}, timeout=60)
    return time.perf_counter() - started, _ended(answer)


def store(session: requests.Session, base_url: str, data: bytes) -> tuple[float, dict]:
    started = time.perf_counter()
    answer = session.post(f"{base_url}/v1/images", files={"image": ("photo.jpg", data, "image/jpeg")}, timeout=60)
    if answer.status_code not in (200, 201):
        raise RuntimeError(f"POST /v1/images: {answer.status_code} {answer.text[:500]}")
    return time.perf_counter() - started, answer.json()


def wait_ready(session: requests.Session, base_url: str, image_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        image = session.get(f"{base_url}/v1/images/{image_id}", timeout=10).json()
        if image["encoding"] == "ready":
            return image
        if image["encoding"] != "queued":
            raise RuntimeError(f"image {image_id}: encoding {image}")
        time.sleep(0.01)
    raise RuntimeError(f"image {image_id}: not ready in {timeout} s")


def click(session: requests.Session, base_url: str, image_id: str, point) -> tuple[float, dict]:
    body = {"image_id": image_id, "prompts": {"points": [[point[0], point[1], 1]]}, "lane": "interactive"}
    started = time.perf_counter()
    answer = session.post(f"{base_url}/v1/jobs", json=body, headers={"Prefer": "wait=30"}, timeout=60)
    return time.perf_counter() - started, _ended(answer)


def _ended(answer: requests.Response) -> dict:
    job = answer.json()
    if answer.status_code != 200 or job.get("status") != "succeeded":
        raise RuntimeError(f"a click did not end in one round trip: {answer.status_code} {job}")
    return job


def service_rounds(rounds: int, warmup: int) -> dict[str, list]:
    out: dict[str, list] = {key: [] for key in ("upload", "store", "ready", "click", "early", "skipped", "encode")}
    with ServiceStack(overrides={"result_cache_enabled": False}) as stack:
        session = requests.Session()
        session.headers.update(stack.headers)
        base = stack.base_url
        for i in range(warmup + rounds):
            name, point, _ = CLICKS[i % len(CLICKS)]
            photo = (PHOTOS / name).read_bytes()
            upload_s, _ = upload_and_click(session, base, variant(photo, 3 * i), point)
            started = time.perf_counter()
            store_s, image = store(session, base, variant(photo, 3 * i + 1))
            image = wait_ready(session, base, image["id"])
            ready_s = time.perf_counter() - started
            click_s, job = click(session, base, image["id"], point)
            _, early_image = store(session, base, variant(photo, 3 * i + 2))
            early_s, _ = click(session, base, early_image["id"], point)
            if i < warmup:
                continue
            out["upload"].append(upload_s)
            out["store"].append(store_s)
            out["ready"].append(ready_s)
            out["click"].append(click_s)
            out["early"].append(early_s)
            out["skipped"].append(job["result"]["embedding"]["cached"] and "encode" not in job["metrics"])
            out["encode"].append(image["encode_s"])
    return out


def run(options: Options) -> list[dict]:
    rounds = max(3, min(options.jobs, MAX_ROUNDS))
    service = service_rounds(rounds, warmup=min(options.warmup, 2))
    ratio = percentile(service["click"], 50) / percentile(service["upload"], 50)
    return [
        timing_row(UPLOAD_AND_CLICK, service["upload"]),
        timing_row(STORE, service["store"]),
        timing_row(READY, service["ready"], encode_task_p50_ms=round(percentile(service["encode"], 50) * 1000, 1)),
        timing_row(
            CLICK,
            service["click"],
            click_over_upload_and_click=round(ratio, 3),
            target="<= 0.15",
            encoder_skipped=f"{sum(service['skipped'])}/{len(service['click'])}",
        ),
        timing_row(
            EARLY,
            service["early"],
            early_over_upload_and_click=round(percentile(service["early"], 50) / percentile(service["upload"], 50), 3),
        ),
    ]


def summary(rows: list[dict]) -> list[str]:
    row = next(r for r in rows if r["case"] == CLICK)
    return [
        f"first_click_over_upload_and_click={row.get('click_over_upload_and_click')} "
        f"(target <= 0.15; encoder skipped {row.get('encoder_skipped')})"
    ]
