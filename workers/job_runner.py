"""One job through a worker: may it run, on which model, through the pipeline, to its end.

``tasks/run_job.py`` calls :func:`run` for every ``maskq.run_job`` message.
The job record decides whether the job runs at all: a job that is gone,
past its deadline, canceled, or already ended (a redelivered message) stops
here. A job of a model that stacks batches may take more queued jobs along
(``workers/batching.py``); every other job is one image through
:func:`workers.pipeline.run`. However the job ends, :mod:`workers.job_end`
ends it.
"""
from __future__ import annotations

import logging
import time

from domain.records import JobRecord, JobState
from domain.schemas import JobRequest
from storage.retrying import RetryingStorage
from workers import batching, job_end, pipeline, process
from workers.loaded_models import ModelChoice

log = logging.getLogger(__name__)


def run(job_id: str) -> None:
    worker = process.current()
    try:
        _run(worker, job_id)
    finally:
        # However it ended, identical jobs waiting on it get its result or its place; a success fills the cache.
        job_end.settle(worker.jobs, worker.settings, worker.models.catalog, job_id)


def _run(worker: process.WorkerProcess, job_id: str) -> None:
    jobs = worker.jobs
    record = jobs.get(job_id)
    if record is None:
        log.info("job %s: no record (expired or deleted); dropping it", job_id)
        return
    if record.status == JobState.QUEUED and record.deadline_at and time.time() > record.deadline_at:
        if jobs.expire(job_id):
            log.info("job %s: deadline passed before it started; expired", job_id)
        return
    started = time.monotonic()
    try:
        choice = _choose(worker, record)
        # A redelivered job that already ended, or a job canceled while queued, stops here.
        if not jobs.start(job_id, choice.model_version, model_used=choice.model_used):
            now = jobs.get(job_id)
            log.info("job %s: is %s; not running it", job_id, now.status if now else "gone")
            return
        outcome = _segment(worker, record, choice)
    except Exception as exc:  # whatever went wrong, the record ends: a job is never left queued or running
        outcome = exc
    job_end.end_job(worker, record, outcome, time.monotonic() - started)


def _choose(worker: process.WorkerProcess, record: JobRecord) -> ModelChoice:
    """The adapter the job runs on: its model's, else a fallback ("degraded"); a changed manifest applies now."""
    worker.models.refresh()
    choice = worker.models.choose(record.model, JobRequest.model_validate(record.request).prompts.kinds)
    if choice.degraded:
        log.warning("job %s: running on fallback model %s: %s", record.id, choice.adapter.name, choice.reason)
    return choice


def _segment(worker: process.WorkerProcess, record: JobRecord, choice: ModelChoice) -> tuple[str, int]:
    """``(result_key, instance count)`` of the job; jobs taken along in a batch end inside the batch."""
    settings = worker.settings
    # A store that is away for less than storage_retry_bound_s only delays the job; past it, code "storage".
    storage = RetryingStorage.from_settings(worker.storage, settings)
    if batching.wanted(choice, settings):
        return batching.run(worker, record, choice, storage)
    return pipeline.run(record, choice.adapter, storage, settings.max_image_bytes, settings.max_image_pixels)
