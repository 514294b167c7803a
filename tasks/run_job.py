"""The Celery task that runs one job; the job record decides whether it may run.

Outcomes: ``succeeded``; ``failed`` with a code (``input``, ``model``,
``timeout``, ``resources``, ``storage``, ``internal``); put back on its lane
after an out-of-memory error; or not run at all because the record says the
job was canceled, expired, or already ended (a redelivered message).
"""
from __future__ import annotations

import logging
import time

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from tasks import result_cache
from tasks.errors import InputError, MaskqError, ResourceExhausted
from storage.retrying import RetryingStorage
from tasks.records import JobRecord, JobState, JobStore
from tasks.schemas import JobRequest
from tasks.webhooks import JobEvents
from workers import batching, pipeline, process

log = logging.getLogger(__name__)


class JobTask(Task):
    """Ends the record of a job whose pool process was killed for its hard time limit.

    Celery calls ``on_failure`` in the worker's main process then, where no
    model (and no :func:`workers.process.current`) exists, so this keeps a
    connection of its own.
    """

    _jobs: JobStore | None = None

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        if isinstance(exc, TimeLimitExceeded):
            job_id = args[0] if args else task_id
            log.info("job %s: killed at its hard time limit", job_id)
            self.main_process_jobs().fail(job_id, "timeout", f"the job ran past its hard time limit ({exc})")
            result_cache.settle_job(job_id, self.main_process_jobs(), self.app)

    @classmethod
    def main_process_jobs(cls) -> JobStore:
        if cls._jobs is None:
            import redis

            from config.settings import load_settings

            settings = load_settings()
            client = redis.Redis.from_url(settings.broker_url)
            cls._jobs = JobStore(client, settings.job_ttl_s, on_moved=JobEvents(client))
        return cls._jobs


@shared_task(name="maskq.run_job", base=JobTask, bind=True)
def run_job(self, job_id: str) -> None:
    try:
        _run(self, job_id)
    finally:
        # However it ended, identical jobs waiting on it get its result or its place; a success fills the cache.
        result_cache.settle_after_run(job_id)


def _run(self, job_id: str) -> None:
    worker = process.current()
    jobs = worker.jobs
    record = jobs.get(job_id)
    if record is None:
        log.info("job %s: no record (expired or deleted); dropping it", job_id)
        return
    if record.status == JobState.QUEUED and record.deadline_at and time.time() > record.deadline_at:
        if jobs.expire(job_id):
            log.info("job %s: deadline passed before it started; expired", job_id)
        return
    # A changed manifest takes effect between jobs: this job runs on the version loaded now, and
    # records it. A model that failed to load hands the job to its fallback ("degraded").
    worker.models.refresh()
    try:
        choice = worker.models.choose(record.model, JobRequest.model_validate(record.request).prompts.kinds)
    except MaskqError as exc:
        log.info("job %s: %s", job_id, exc.detail)
        jobs.fail(job_id, exc.code, exc.detail)
        return
    adapter = choice.adapter
    if choice.degraded:
        log.warning("job %s: running on fallback model %s: %s", job_id, adapter.name, choice.reason)
    # A redelivered job that already ended, or a job canceled while queued, stops here.
    if not jobs.start(job_id, choice.model_version, model_used=choice.model_used):
        log.info("job %s: is %s; not running it", job_id, jobs.get(job_id).status if jobs.get(job_id) else "gone")
        return
    started = time.monotonic()
    settings = worker.settings
    try:
        if settings.debug_delay_s:
            time.sleep(settings.debug_delay_s)
        # A store that is away for less than storage_retry_bound_s only delays the job; past it, code "storage".
        storage = RetryingStorage.from_settings(worker.storage, settings)
        # With more queued jobs of a model that batches, they run along (and end) in the same call.
        key, count = batching.run(worker, record, choice, storage)
    except InputError as exc:
        log.info("job %s: bad input: %s", job_id, exc.detail)
        jobs.fail(job_id, exc.code, exc.detail)
    except SoftTimeLimitExceeded:
        log.info("job %s: over its soft time limit", job_id)
        jobs.fail(job_id, "timeout", "the job ran past its time limit")
    except ResourceExhausted as exc:
        _put_back(self, record, exc)
    except MaskqError as exc:
        log.error("job %s: %s", job_id, exc.detail, exc_info=True)
        jobs.fail(job_id, exc.code, exc.detail)
    except Exception as exc:
        log.exception("job %s: unexpected error", job_id)
        jobs.fail(job_id, "internal", f"{type(exc).__name__}: {exc}")
    else:
        if jobs.succeed(job_id, key, count):
            jobs.record_duration(time.monotonic() - started)
            log.info("job %s: succeeded with %d instances", job_id, count)
        elif (now := jobs.get(job_id)) is not None and now.status == JobState.CANCELED:
            # Canceled while it ran: the model could not be stopped, so its result is discarded.
            pipeline.discard_result(record, worker.storage)
            log.info("job %s: canceled while running; result discarded", job_id)
        else:
            # Another run of this job ended it first (a redelivery): its result, at the same keys, stays.
            log.info("job %s: already ended by another run; keeping its result", job_id)


def _put_back(task: Task, record: JobRecord, exc: ResourceExhausted) -> None:
    """Out of device memory: back on its lane after a delay, a bounded number of times."""
    settings = process.current().settings
    jobs = process.current().jobs
    retries = task.request.retries
    if retries >= settings.oom_retries:
        log.info("job %s: out of memory %d times; giving up", record.id, retries + 1)
        jobs.fail(record.id, "resources", f"the device ran out of memory {retries + 1} times: {exc.detail}")
        return
    if jobs.requeue(record.id, {"code": exc.code, "message": exc.detail}):
        log.info("job %s: out of memory; back on the %s lane in %.0f s", record.id, record.lane, settings.oom_retry_delay_s)
        raise task.retry(countdown=settings.oom_retry_delay_s, max_retries=settings.oom_retries, queue=record.lane)
