"""When two jobs are the same (:func:`cache_key`), and where a job's files are (:func:`file_key`).

Two jobs are *the same* when they would give the same result: the same image
bytes (SHA-256), the same prompts and outputs (canonical JSON of the validated
request; lane, webhook and deadline do not change a result), the same model
name and version, and the same tenant. The result cache and the coalescing of
identical jobs (``stores/result_cache.py``) are keyed by that digest.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from domain.keys import job_prefix
from domain.records import JobRecord
from domain.schemas import JobRequest


def cache_key(request: JobRequest | dict[str, Any], *, image_sha256: str, model: str, version: str, tenant: str) -> str:
    """The digest of everything that decides a job's result, and nothing else."""
    if not isinstance(request, JobRequest):
        request = JobRequest.model_validate(request)
    what: dict[str, Any] = {
        "v": 1,
        "tenant": tenant,
        "model": model,
        "version": version,
        "image_sha256": image_sha256,
        # Validated, so [1, 2, 1] and [1.0, 2.0, 1] are the same point.
        "prompts": request.prompts.model_dump(mode="json"),
        # The pipeline asks "is 'png' among the outputs": order and repeats do not matter.
        "outputs": sorted(set(request.outputs)),
    }
    if request.points_per_side is not None:  # changes a segment-everything result
        what["points_per_side"] = request.points_per_side
    canonical = json.dumps(what, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# A video job's masks drawn on its clip (workers/video_overlay.py), under the job's prefix: served as
# GET /v1/jobs/{id}/files/video/overlay.mp4.
OVERLAY_FILE = "video/overlay.mp4"


def file_key(record: JobRecord, name: str) -> str:
    """The storage key of a job's file ``name`` (``masks/…`` or its input's file name).

    A cached or coalesced job shows the masks (and, for a hit, the input) of
    the job that ran the model; a job that ran shows its own.
    """
    if name.startswith("masks/") and record.result_key:
        return record.result_key.rpartition("/")[0] + "/" + name
    if record.input_key and name == record.input_key.rpartition("/")[2]:
        return record.input_key
    return job_prefix(record.tenant, record.id) + name
