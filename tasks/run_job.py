"""The Celery task that runs one job (``workers/job_runner.py`` does the work)."""

from __future__ import annotations

from celery import Task, shared_task
from celery.worker import state
from celery.worker.request import Request

from config.task_names import RUN_JOB
from stores.fleet import process_name
from workers import job_end, job_runner


class JobRequest(Request):
    """Ends the record of a job whose pool process was killed at its hard time limit.

    Celery calls ``on_timeout`` in the worker's main process then, where no pool process is left to do it.
    The request knows which pool process ran the job (``worker_pid``): the record is failed only while
    that process's run still holds it, so a job taken over meanwhile by another worker is left to it.
    """

    def on_timeout(self, soft, timeout):
        super().on_timeout(soft, timeout)
        if soft or state.should_terminate:  # (a cold shutdown's kill: the job is not ended, it comes back)
            return
        job_id = self.args[0] if self.args else self.id
        run = process_name(self.worker_pid) if self.worker_pid else None
        job_end.end_killed_job(job_id, f"Hard time limit ({timeout}s) exceeded", run)


class JobTask(Task):
    Request = JobRequest


@shared_task(name=RUN_JOB, base=JobTask, bind=True)
def run_job(self, job_id: str) -> None:
    # The job's W3C trace context rides in the message's headers (stores/lanes.py send_job).
    job_runner.run(job_id, traceparent=self.request.get("traceparent"))
