"""How a job ends, in one place, whether it ran alone (``workers/job_runner.py``) or in a batch.

:func:`end_job` takes what running the job gave, a result or an exception,
and moves the record:

- a run that found the job no longer its own (``RunStopped``: before writing its result, or a video
  between two frames; the job was canceled, or put back for another run): nothing; the record
  already says where the job is.
- a result ``(result_key, instance count)``: ``succeeded``. If the job was
  canceled in the moment between the run's last look and its write, its result is
  discarded; if another run of it ended it first (a redelivery), that run's
  result, at the same keys, stays.
- ``InputError``: ``failed`` with its code (``input``), logged at INFO.
- ``SoftTimeLimitExceeded``: ``failed`` with ``timeout``.
- out of memory (:class:`ResourceExhausted`, ``MemoryError``, or ONNX Runtime
  saying it could not allocate): back on its lane after ``oom_retry_delay_s``
  while the job has had at most ``oom_retries`` attempts, then ``failed``
  with ``resources``. Attempts are counted by the record's start transition,
  so a retry after a crash counts too.
- another :class:`MaskqError`: ``failed`` with its code, logged as an error.
- anything else: ``failed`` with ``internal``.

Then :func:`settle` fills the result cache and resolves the identical jobs
that waited on this one. It runs for every job that leaves a worker, however
it left, and never raises.
"""

from __future__ import annotations

import functools
import logging

import redis
from celery.exceptions import SoftTimeLimitExceeded

from config.settings import Settings, load_settings
from domain.errors import InputError, MaskqError, ResourceExhausted
from domain.records import JobRecord, JobState
from models.catalog import ModelCatalog
from runtime.redis_connection import service_client
from stores import job_metrics
from stores.jobs import JobStore
from stores.lanes import send_job
from stores.result_cache import ResultCache
from stores.webhooks import JobEvents
from workers import pipeline

log = logging.getLogger(__name__)

Outcome = pipeline.Success | BaseException  # (result_key, count[, seconds per phase]), or what the job raised

# How ONNX Runtime and its providers word an allocation failure.
_OOM_MESSAGES = ("out of memory", "failed to allocate memory", "bad_alloc", "cudaerrormemoryallocation")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device (host or GPU) could not allocate memory."""
    return isinstance(exc, (MemoryError, ResourceExhausted)) or any(m in str(exc).lower() for m in _OOM_MESSAGES)


def end_job(worker, record: JobRecord, outcome: Outcome, ran_for_s: float) -> None:
    """Move ``record``'s job to where ``outcome`` leads (see the module's docstring)."""
    if isinstance(outcome, pipeline.RunStopped):  # canceled, or taken by another run: the record says so
        log.info("job %s: this run stopped: %s", record.id, outcome.detail)
        return
    if isinstance(outcome, tuple):
        _succeed(worker, record, outcome, ran_for_s)
    elif out_of_memory(outcome):
        _out_of_memory(worker, record, outcome)
    else:
        code, detail = describe_failure(record.id, outcome)
        if worker.jobs.fail(record.id, code, detail, fence=worker.owner):
            log.info("job %s: failed with %s (run of %s)", record.id, code, worker.owner)
        else:
            log.info(
                "job %s: ended elsewhere, or taken over by another run; this run's failure is not recorded", record.id
            )


def _succeed(worker, record: JobRecord, outcome: tuple, ran_for_s: float) -> None:
    """``outcome``: ``(result_key, count)``, or ``(result_key, count, seconds per phase)`` from the pipeline."""
    jobs, (key, count), timings = worker.jobs, outcome[:2], (outcome[2] if len(outcome) > 2 else None)
    if jobs.succeed(record.id, key, count, fence=worker.owner, timings=timings):
        jobs.record_duration(ran_for_s)
        log.info("job %s: succeeded with %d instances (run of %s)", record.id, count, worker.owner)
    elif (now := jobs.get(record.id)) is not None and now.status == JobState.CANCELED:
        pipeline.discard_result(record, worker.storage)
        log.info("job %s: canceled while running; result discarded", record.id)
    elif now is not None and now.status == JobState.RUNNING:
        log.warning(
            "job %s: taken over by another run (%s) while this one ran; not recorded here", record.id, now.worker
        )
    else:
        log.info("job %s: already ended by another run; keeping its result", record.id)


def _out_of_memory(worker, record: JobRecord, exc: BaseException) -> None:
    settings, jobs = worker.settings, worker.jobs
    detail = exc.detail if isinstance(exc, MaskqError) else f"out of memory during inference: {exc}"
    now = jobs.get(record.id)
    attempts = now.attempts if now is not None else record.attempts
    if attempts > settings.oom_retries:
        log.info("job %s: out of memory %d times; giving up", record.id, attempts)
        jobs.fail(
            record.id, "resources", f"the device ran out of memory {attempts} times: {detail}", fence=worker.owner
        )
        return
    if jobs.requeue(record.id, {"code": ResourceExhausted.code, "message": detail}, fence=worker.owner):
        jobs.metrics.count(job_metrics.OOM_REQUEUES, record.model)
        send_job(
            None,
            record.id,
            record.lane,
            time_limits(worker, record.model, record.media),
            countdown=settings.oom_retry_delay_s,
        )
        log.info(
            "job %s: out of memory; back on the %s lane in %.1f s", record.id, record.lane, settings.oom_retry_delay_s
        )


def describe_failure(job_id: str, exc: BaseException) -> tuple[str, str]:
    """A failed job's error code and message, logged at the level its kind deserves."""
    if isinstance(exc, InputError):
        log.info("job %s: bad input: %s", job_id, exc.detail)
        return exc.code, exc.detail
    if isinstance(exc, SoftTimeLimitExceeded):
        log.info("job %s: over its soft time limit", job_id)
        return "timeout", "the job ran past its time limit"
    if isinstance(exc, MaskqError):
        log.error("job %s: %s", job_id, exc.detail, exc_info=exc)
        return exc.code, exc.detail
    log.error("job %s: unexpected error", job_id, exc_info=exc)
    return "internal", f"{type(exc).__name__}: {exc}"


def time_limits(worker, model: str, media: str = "image") -> tuple[float, float]:
    """``(soft, hard)`` seconds for a job of ``model``; the deployment's when the manifest no longer has it."""
    settings = worker.settings
    try:
        return worker.models.catalog.current().time_limits(model, settings, media)
    except MaskqError:
        return settings.job_soft_time_limit_s, settings.job_hard_time_limit_s


def settle(jobs, settings, catalog, job_id: str) -> None:
    """:meth:`ResultCache.settle` after job ``job_id`` left a worker.

    Raises only that Redis is unreachable (the caller may wait for it); any
    other failure is logged and leaves the job's own outcome as it is: the
    jobs that waited on it are taken over by the next identical submission.
    """
    try:
        ResultCache(jobs, settings, catalog).settle(job_id)
    except (redis.ConnectionError, redis.TimeoutError):
        raise
    except Exception:
        log.exception("job %s: could not settle the jobs waiting on it", job_id)


def end_killed_job(job_id: str, why: str, run: str | None) -> None:
    """A job whose pool process (``run``: its fleet name) was killed at its hard time limit: ``failed`` with
    ``timeout``, while that run still holds it (a job put back and taken by another worker is left alone).

    Called in the worker's main process, where no :class:`~workers.process.WorkerProcess`
    exists: it keeps a connection of its own. ``run`` None (Celery did not say which process): unfenced.
    """
    jobs, settings = _main_process_jobs()
    if jobs.fail(job_id, "timeout", f"the job ran past its hard time limit ({why})", fence=run):
        log.info("job %s: killed at its hard time limit", job_id)
    else:
        log.info("job %s: killed at its hard time limit, but no longer that run's; left as it is", job_id)
    settle(jobs, settings, ModelCatalog.from_settings(settings), job_id)


@functools.cache
def _main_process_jobs() -> tuple[JobStore, Settings]:
    settings = load_settings()
    client = service_client(settings)
    return JobStore(client, settings.job_ttl_s, on_moved=JobEvents(client)), settings
