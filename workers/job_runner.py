"""One job through a worker: may it run, on which model, through the pipeline, to its end.

``tasks/run_job.py`` calls :func:`run` for every ``maskq.run_job`` message.
The job record decides whether the job runs at all: a job that is gone,
past its deadline, canceled, or already ended (a redelivered message) stops
here, and a job started more than ``job_max_attempts`` times fails (its
process died every time: ``attempts``). A job of a model that stacks batches
may take more queued jobs along (``workers/batching.py``); every other job is
one image through :func:`workers.pipeline.run`. However the job ends,
:mod:`workers.job_end` ends it.

Reading and writing the record ride out a Redis outage
(``workers/redis_outage.py``): a job whose model ran keeps its outcome until
Redis answers again, and its message is acknowledged only after that.
"""

from __future__ import annotations

import functools
import logging
import time

from domain.records import JobRecord, JobState
from runtime import logs
from storage.retrying import RetryingStorage
from workers import batching, job_end, pipeline, process, video_job
from workers.loaded_models import ModelChoice
from workers.redis_outage import UNREACHABLE, ride_out

log = logging.getLogger(__name__)


def run(job_id: str, traceparent: str | None = None) -> None:
    """Run job ``job_id``; every line logged meanwhile carries the job (runtime/logs.py)."""
    with logs.job_context(job_id=job_id, traceparent=traceparent):
        _run(job_id)


def _run(job_id: str) -> None:
    worker = process.current()
    bound_s = worker.settings.visibility_timeout_s
    try:
        try:
            started = ride_out(lambda: _start(worker, job_id), bound_s=bound_s, what=f"job {job_id}: starting")
        except UNREACHABLE:
            raise  # past the bound: the message stays unacknowledged and recovery finds the job
        except Exception as exc:  # a record that no longer reads, say: the job ends, it is not left queued
            code, detail = job_end.describe_failure(job_id, exc)
            worker.jobs.fail(job_id, code, f"the job could not be started: {detail}")
            return
        if started is None:
            return
        record, choice, since = started
        outcome: job_end.Outcome
        try:
            outcome = _segment(worker, record, choice)
        except Exception as exc:  # whatever went wrong, the record ends: a job is never left running
            outcome = exc
        ride_out(
            lambda: job_end.end_job(worker, record, outcome, time.monotonic() - since),
            bound_s=bound_s,
            what=f"job {job_id}: recording its outcome",
        )
    finally:
        worker.finish(job_id)
        # However it ended, identical jobs waiting on it get its result or its place; a success fills the cache.
        ride_out(
            lambda: job_end.settle(worker.jobs, worker.settings, worker.models.catalog, job_id),
            bound_s=bound_s,
            what=f"job {job_id}: settling the jobs that wait on it",
        )


def _start(worker: process.WorkerProcess, job_id: str) -> tuple[JobRecord, ModelChoice, float] | None:
    """Start the job on its model: ``(record, choice, monotonic start)``, or None when it must not run."""
    jobs = worker.jobs
    record = jobs.get(job_id)
    if record is None:
        log.info("job %s: no record (expired or deleted); dropping it", job_id)
        return None
    # The message's trace context, else the record's (a message resent by recovery carries none).
    message_trace = "trace_id" in logs.current_job()
    logs.bind_job(
        tenant=record.tenant,
        model=record.model,
        lane=record.lane,
        traceparent=None if message_trace else record.traceparent,
    )
    if record.status == JobState.QUEUED and record.deadline_at and time.time() > record.deadline_at:
        if jobs.expire(job_id):
            log.info("job %s: deadline passed before it started; expired", job_id)
        return None
    if record.cancel_at is not None and time.time() >= record.cancel_at:  # upkeep has not got to it yet
        if jobs.cancel_overdue(job_id):
            log.info("job %s: its Cancel-After passed before it started; canceled", job_id)
        return None
    try:
        choice = _choose(worker, record)
    except Exception as exc:  # no model for it (or a stored request that no longer reads): it fails, it is not lost
        code, detail = job_end.describe_failure(job_id, exc)
        jobs.fail(job_id, code, detail)
        return None
    worker.begin(job_id)  # announced before the record says so: recovery never sees it running unclaimed
    # A redelivered job that already ended, or a job canceled while queued, stops here.
    attempts = jobs.start(job_id, choice.model_version, model_used=choice.model_used, worker=worker.owner)
    if not attempts:
        now = jobs.get(job_id)
        log.info("job %s: is %s; not running it", job_id, now.status if now else "gone")
        return None
    if attempts > worker.settings.job_max_attempts:
        log.warning("job %s: started %d times and never finished; failing it", job_id, attempts)
        jobs.fail(
            job_id,
            "attempts",
            f"the job was started {attempts} times and its worker stopped each time "
            "before it ended (out of memory, or a crash); it will not be tried again",
        )
        return None
    # One line per model run, naming the run (tests/cluster/history.py holds runs to attempts by it).
    log.info("job %s: attempt %d started by %s", job_id, attempts, worker.owner)
    return record, choice, time.monotonic()


def _choose(worker: process.WorkerProcess, record: JobRecord) -> ModelChoice:
    """The adapter the job runs on: its model's, else a fallback ("degraded"); a changed manifest applies now."""
    worker.models.refresh()
    choice = worker.models.choose(record.model, record.request.prompts.kinds)
    if choice.degraded:
        log.warning("job %s: running on fallback model %s: %s", record.id, choice.adapter.name, choice.reason)
    return choice


def _segment(worker: process.WorkerProcess, record: JobRecord, choice: ModelChoice) -> pipeline.Success:
    """``(result_key, instance count[, seconds per phase])`` of the job; jobs taken along in a batch end inside
    the batch."""
    settings = worker.settings
    # A store that is away for less than storage_retry_bound_s only delays the job; past it, code "storage".
    storage = RetryingStorage.from_settings(worker.storage, settings)
    if record.media == "video":  # a clip: frame by frame, stored in chunks, resumable (workers/video_job.py)
        return video_job.run(worker, record, choice.adapter, storage)
    if batching.wanted(choice, settings):
        return batching.run(worker, record, choice, storage)
    holds = functools.partial(worker.holds, record.id)  # no result written over a run that took the job over
    return pipeline.run(record, choice.adapter, storage, settings.max_image_bytes, settings.max_image_pixels, holds)
