"""The Celery task (run by beat) that applies retention (``workers/retention.py`` does the work)."""

from __future__ import annotations

import logging

from celery import shared_task

from config.task_names import APPLY_RETENTION
from workers import process, retention

log = logging.getLogger(__name__)


@shared_task(name=APPLY_RETENTION, ignore_result=True)
def apply_retention() -> dict:
    worker = process.current()
    done = retention.sweep(worker.redis, worker.storage, worker.settings)
    log.info(
        "retention: %d job(s), %d object(s) and %d stored image(s) deleted, %d folder(s) adopted, "
        "%d temporary file(s) removed",
        done.jobs_deleted,
        done.objects_deleted,
        done.images_deleted,
        done.jobs_adopted,
        done.partial_files_deleted,
    )
    return done.__dict__
