"""``maskq segment FOLDER``: a data team's batch run over a folder of images, written out as COCO JSON.

A client of the HTTP API like any other: each image is submitted (lane
``batch`` unless told otherwise) with an ``Idempotency-Key`` derived from the
image and the request, so running the command again after an interruption
picks up the same jobs instead of submitting them twice; ``429`` and ``503``
are retried after their ``Retry-After``; an image the service refuses is
reported and skipped, never fatal.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
ENDED = {"succeeded", "failed", "canceled", "expired"}


@dataclass
class Outcome:
    path: Path
    job: dict | None = None
    error: str | None = None


@dataclass
class BatchClient:
    """Submits images to a maskq service and waits for their jobs."""

    base_url: str
    api_key: str | None
    request: dict = field(default_factory=dict)
    max_attempts: int = 20

    def __post_init__(self):
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            if self.api_key:
                self._local.session.headers["Authorization"] = f"Bearer {self.api_key}"
        return self._local.session

    def segment(self, path: Path) -> Outcome:
        data = path.read_bytes()
        body = json.dumps(self.request, sort_keys=True)
        key = hashlib.sha256(data + b"\0" + body.encode()).hexdigest()
        for _ in range(self.max_attempts):
            answer = self.session.post(f"{self.base_url}/v1/jobs", headers={"Idempotency-Key": key},
                                       files={"image": (path.name, data)}, data={"request": body}, timeout=120)
            if answer.status_code in (409, 429, 503):  # busy: come back when told
                time.sleep(float(answer.headers.get("Retry-After", 1)))
                continue
            if answer.status_code >= 400:
                return Outcome(path, error=f"{answer.status_code}: {_detail(answer)}")
            job = answer.json()
            while job["status"] not in ENDED:
                job = self.session.get(f"{self.base_url}/v1/jobs/{job['id']}", params={"wait": 30}, timeout=90).json()
            if job["status"] != "succeeded":
                return Outcome(path, job, error=f"{job['status']}: {job.get('error', {}).get('message', '')}")
            return Outcome(path, job)
        return Outcome(path, error="the service stayed busy; try again later")


def _detail(answer: requests.Response) -> str:
    try:
        return answer.json().get("detail", answer.text)
    except ValueError:
        return answer.text[:200]


def find_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def to_coco(outcomes: list[Outcome], folder: Path) -> dict:
    """COCO detection results: images, one annotation per instance (RLE segmentation), one category per label source."""
    images, annotations, categories = [], [], {}
    for image_id, outcome in enumerate((o for o in outcomes if o.job), start=1):
        job, result = outcome.job, outcome.job["result"]
        images.append({"id": image_id, "file_name": str(outcome.path.relative_to(folder)),
                       "width": result["width"], "height": result["height"], "maskq_job_id": job["id"]})
        model = job["model"]["name"]
        category = categories.setdefault(model, {"id": len(categories) + 1, "name": model})
        for instance in result["instances"]:
            annotation = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category["id"],
                          "bbox": instance["bbox"], "area": instance["area"], "iscrowd": 0,
                          "score": instance["score"], "label": instance.get("label")}
            if "mask" in instance:
                annotation["segmentation"] = instance["mask"]
            annotations.append(annotation)
    return {"info": {"description": "maskq batch run"}, "images": images, "annotations": annotations,
            "categories": list(categories.values()),
            "failures": [{"file_name": str(o.path.relative_to(folder)), "error": o.error} for o in outcomes if o.error]}


def segment_folder(client: BatchClient, folder: Path, concurrency: int = 8, progress=None) -> dict:
    paths = find_images(folder)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = []
        for outcome in pool.map(client.segment, paths):
            outcomes.append(outcome)
            if progress:
                progress(outcome, len(outcomes), len(paths))
    return to_coco(outcomes, folder)
