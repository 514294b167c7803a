"""Batches: many images posted at once (``POST /v1/batches``), one job each, followed as one thing.

A batch is a hash in Redis beside two collections (domain/keys.py; kept by ``stores/batches.py``):

- ``…:jobs``: its jobs in upload order, ``[job id, file name]`` each;
- ``…:pending``: the ids of its jobs that have not ended.

The web process writes the batch first (``receiving``), adds each job to
``pending`` *before* the job exists (so the job cannot end unseen), and
seals the batch when every image is a job; while it fans out it touches the
batch with each image (``touched_at``, and its score in the index of batches
still receiving). The job's own state move takes
it out of ``pending`` (the transition script in stores/jobs.py); the move
that empties the pending set of a sealed batch completes the batch in the
same step and marks its ``batch.completed`` event due. Whoever notices a due
event (the web after sealing, every worker's upkeep) takes it under a lease
and queues its webhook; a process that dies in between leaves the lease to
run out, and the next one queues it. A batch that goes quiet while receiving
(its uploader died mid fan-out) is sealed with the jobs it has once
``batch_receive_timeout_s`` has passed since its last touch, by every worker's
upkeep (so a webhook-only client still gets ``batch.completed``) or by a read.
Everything is in Redis, so a batch outlives any web or worker restart.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from domain.records import ENDED, JobState, rfc3339

STATES = tuple(str(s) for s in JobState)


@dataclass
class BatchRecord:
    """What the service keeps about one batch (its jobs are kept beside it)."""

    id: str
    tenant: str
    created_at: float
    total: int = 0
    lane: str = "batch"
    model: str | None = None
    webhook: dict[str, Any] | None = None
    rejected: list[dict[str, Any]] = field(default_factory=list)
    touched_at: float | None = None  # its fan-out's last sign of life (None: none since created_at)
    sealed_at: float | None = None
    completed_at: float | None = None
    canceled_at: float | None = None

    _JSON = ("webhook", "rejected")
    _FLOATS = ("created_at", "touched_at", "sealed_at", "completed_at", "canceled_at")

    def to_hash(self) -> dict[str, str]:
        return {k: json.dumps(v) if k in self._JSON else str(v) for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> BatchRecord:
        data = {k.decode(): v.decode() for k, v in raw.items()}
        kwargs: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            if name not in data:
                continue
            value = data[name]
            kwargs[name] = (
                json.loads(value)
                if name in cls._JSON
                else float(value)
                if name in cls._FLOATS
                else int(value)
                if name == "total"
                else value
            )
        return cls(**kwargs)

    @property
    def status(self) -> str:
        if self.sealed_at is None:
            return "receiving"
        if self.completed_at is None:
            return "canceling" if self.canceled_at else "running"
        return "canceled" if self.canceled_at else "completed"


def progress(batch: BatchRecord, statuses: list[str], now: float | None = None) -> dict[str, Any]:
    """Counts by status, the fraction done and an estimate of when the rest ends (from the rate so far)."""
    now = now or time.time()
    counts = dict.fromkeys(STATES, 0)
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    done = sum(counts[str(s)] for s in ENDED)
    total = len(statuses)
    eta_s = None
    if batch.completed_at is None and done and total > done:
        rate = done / max(now - batch.created_at, 1e-3)  # jobs ended per second since the batch began
        eta_s = round((total - done) / rate, 1)
    return {
        "counts": counts,
        "done": done,
        "progress": round(done / total, 4) if total else 1.0,
        "eta_s": eta_s,
        "estimated_completion_at": rfc3339(now + eta_s) if eta_s is not None else None,
    }


def document(batch: BatchRecord, entries: list[tuple[str, str]], statuses: list[str], base_url: str) -> dict[str, Any]:
    """The batch as ``GET /v1/batches/{id}`` shows it (and as its ``batch.completed`` webhook carries it)."""
    doc = {
        "id": batch.id,
        "status": batch.status,
        "lane": batch.lane,
        "model": batch.model,
        "total": len(entries),
        **progress(batch, statuses),
        "rejected": batch.rejected,
        "created_at": rfc3339(batch.created_at),
        "completed_at": rfc3339(batch.completed_at),
        "canceled_at": rfc3339(batch.canceled_at),
        "coco_url": f"{base_url.rstrip('/')}/v1/batches/{batch.id}/coco",
        "jobs": [
            {"id": job_id, "file_name": name, "status": status} for (job_id, name), status in zip(entries, statuses)
        ],
    }
    return doc
