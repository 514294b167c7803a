"""The Celery task that runs one job; the record decides whether it may run."""
from __future__ import annotations

import logging

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from tasks.errors import InputError, MaskqError
from workers import pipeline, process

log = logging.getLogger(__name__)


@shared_task(name="maskq.run_job")
def run_job(job_id: str) -> None:
    worker = process.current()
    jobs = worker.jobs
    record = jobs.get(job_id)
    if record is None:
        log.info("job %s: no record (expired or deleted); dropping it", job_id)
        return
    try:
        adapter = worker.models.get(record.model)
    except MaskqError as exc:
        jobs.fail(job_id, exc.code, exc.detail)
        return
    # A redelivered job that already ended, or a job canceled while queued, stops here.
    if not jobs.start(job_id, adapter.version):
        log.info("job %s: is %s; not running it", job_id, record.status)
        return
    settings = worker.settings
    try:
        key, count = pipeline.run(record, adapter, worker.storage, settings.max_image_bytes, settings.max_image_pixels)
    except InputError as exc:
        log.info("job %s: bad input: %s", job_id, exc.detail)
        jobs.fail(job_id, exc.code, exc.detail)
    except SoftTimeLimitExceeded:
        log.info("job %s: over its time limit", job_id)
        jobs.fail(job_id, "timeout", f"the job ran past its time limit of {settings.job_soft_time_limit_s} s")
    except MaskqError as exc:
        log.error("job %s: %s", job_id, exc.detail, exc_info=True)
        jobs.fail(job_id, exc.code, exc.detail)
    except Exception as exc:
        log.exception("job %s: unexpected error", job_id)
        jobs.fail(job_id, "internal", f"{type(exc).__name__}: {exc}")
    else:
        jobs.succeed(job_id, key, count)
        log.info("job %s: succeeded with %d instances", job_id, count)
