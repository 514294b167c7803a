"""Finished jobs as one COCO results file: what ``maskq segment`` writes and ``GET /v1/batches/{id}/coco`` answers.

``images`` (one per succeeded job, with its file name and job id), ``annotations``
(one per instance: bbox, area, score, label, and the RLE mask as
``segmentation``, which pycocotools reads as it is), ``categories`` (one per
model), and ``failures`` (file name and why) for the images that have no result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Item:
    """One image of a run: its file name, and its ended job's document or why it has none."""

    file_name: str
    job: dict[str, Any] | None = None
    error: str | None = None


def coco_document(items: list[Item], description: str = "maskq batch run") -> dict[str, Any]:
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    categories: dict[str, dict[str, Any]] = {}
    failures: list[dict[str, Any]] = []
    for item in items:
        job = item.job
        if item.error or job is None or job.get("status") != "succeeded":
            why = item.error or (f"{job['status']}: {(job.get('error') or {}).get('message', '')}" if job else "no job")
            failures.append({"file_name": item.file_name, "error": why, **({"maskq_job_id": job["id"]} if job else {})})
            continue
        result = job["result"]
        image_id = len(images) + 1
        images.append(
            {
                "id": image_id,
                "file_name": item.file_name,
                "width": result["width"],
                "height": result["height"],
                "maskq_job_id": job["id"],
            }
        )
        model = job["model"]["name"]
        category = categories.setdefault(model, {"id": len(categories) + 1, "name": model})
        for instance in result["instances"]:
            annotation = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category["id"],
                "bbox": instance["bbox"],
                "area": instance["area"],
                "iscrowd": 0,
                "score": instance["score"],
                "label": instance.get("label"),
            }
            if "mask" in instance:
                annotation["segmentation"] = instance["mask"]
            annotations.append(annotation)
    return {
        "info": {"description": description},
        "images": images,
        "annotations": annotations,
        "categories": list(categories.values()),
        "failures": failures,
    }
