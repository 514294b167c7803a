"""The job as clients see it: its record plus its stored result, with file links.

One home for the API's ``GET /v1/jobs/{id}`` body and the webhook body (which
must be equal to it): the web answers with it (``webapp/jobs.py``), and a
worker's webhook delivery (``workers/webhook_delivery.py``) sends the same
document, so it lives below both, apart from the record it reads.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from domain.keys import job_prefix
from domain.records import JobRecord, JobState, rfc3339


class ResultStore(Protocol):
    """What a document needs of object storage (any ``storage.Storage`` backend is one)."""

    def get(self, key: str) -> bytes: ...

    def url(self, key: str) -> str | None: ...


def job_result(record: JobRecord, storage: ResultStore, base_url: str) -> dict[str, Any] | None:
    """The stored result with ``png_url``/``input_url`` links (presigned where the store can, else the API's)."""
    if record.result_key is None:
        return None
    result: dict[str, Any] = json.loads(storage.get(record.result_key))
    prefix = job_prefix(record.tenant, record.id)

    def file_url(key: str) -> str:
        return storage.url(key) or f"{base_url.rstrip('/')}/v1/jobs/{record.id}/files/{key[len(prefix) :]}"

    for instance in result.get("instances", []):  # a video's result has annotations instead (workers/video_job.py)
        key = instance.pop("png_key", None)
        if key:
            instance["png_url"] = file_url(key)
    video = result.get("video")
    if video is not None and (key := video.pop("overlay_key", None)):
        video["overlay_url"] = file_url(key)
    # By its file name, which GET /v1/jobs/{id}/files/ serves: the input may be a stored image's (POST /v1/images).
    input_name = record.input_key.rpartition("/")[2]
    base = base_url.rstrip("/")
    result["input_url"] = storage.url(record.input_key) or f"{base}/v1/jobs/{record.id}/files/{input_name}"
    return result


def job_document(record: JobRecord, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job as ``GET /v1/jobs/{id}`` shows it (and as webhooks carry it); ``result`` from :func:`job_result`."""
    doc: dict[str, Any] = {
        "id": record.id,
        "status": str(record.status),
        "lane": record.lane,
        "model": {"name": record.model, "version": record.model_version or None},
        "degraded": record.model_used is not None,
        "created_at": rfc3339(record.created_at),
        "started_at": rfc3339(record.started_at),
        "finished_at": rfc3339(record.finished_at),
        "cached": record.cached,
    }
    if record.model_used is not None:
        doc["model_used"] = {"name": record.model_used["name"], "version": record.model_used["version"]}
        doc["degraded_reason"] = record.model_used.get("reason")
    if record.coalesced_with:
        doc["coalesced_with"] = record.coalesced_with
    if record.cancel_at is not None:
        doc["cancel_at"] = rfc3339(record.cancel_at)
    if record.media == "video":
        doc["progress"] = video_progress(record)
    if result is not None:
        doc["result"] = result
    if record.error:
        doc["error"] = record.error
    doc["metrics"] = record.metrics()
    if record.traceparent:
        doc["traceparent"] = record.traceparent
    return doc


def video_progress(record: JobRecord, now: float | None = None) -> dict[str, Any]:
    """A video job's frames done out of those it takes, and the seconds left at this run's rate so far."""
    done, total = record.frames_done or 0, record.frames_total or 0
    progress: dict[str, Any] = {"frames_done": done, "frames_total": total, "eta_s": None}
    # The rate of the run now going: the frames it stored since it started (a resumed run's own).
    mine = sum(c["frames"] for c in record.chunks or [] if c.get("attempt") == record.attempts)
    if record.status == JobState.RUNNING and record.started_at is not None and mine:
        elapsed = (now or time.time()) - record.started_at
        progress["eta_s"] = round((total - done) * elapsed / mine, 1)
    elif record.status == JobState.SUCCEEDED:
        progress["eta_s"] = 0
    return progress


def stored_job_document(record: JobRecord, storage: ResultStore, base_url: str) -> dict[str, Any]:
    """:func:`job_document` with the job's stored result read from ``storage``."""
    return job_document(record, job_result(record, storage, base_url))
