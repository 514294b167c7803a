"""The Celery task that runs one job (``workers/job_runner.py`` does the work)."""

from __future__ import annotations

from celery import Task, shared_task
from celery.exceptions import TimeLimitExceeded

from config.task_names import RUN_JOB
from workers import job_end, job_runner


class JobTask(Task):
    """Ends the record of a job whose pool process was killed at its hard time limit.

    Celery calls ``on_failure`` in the worker's main process then, where no
    pool process is left to do it.
    """

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        if isinstance(exc, TimeLimitExceeded):
            job_end.end_killed_job(args[0] if args else task_id, str(exc))


@shared_task(name=RUN_JOB, base=JobTask, bind=True)
def run_job(self, job_id: str) -> None:
    # The job's W3C trace context rides in the message's headers (stores/lanes.py send_job).
    job_runner.run(job_id, traceparent=self.request.get("traceparent"))
