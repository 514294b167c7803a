"""Logging for every maskq process: text on a terminal, or one JSON object per line
(``MASKQ_LOG_FORMAT=json``), and the job a line is about.

Code that works on a job wraps it in :func:`job_context` (the web while it
handles a submit, a worker while it runs the job, the webhook worker while it
delivers an event); every line logged inside carries the job's id, tenant,
model, lane and trace id: in JSON as fields, in text as a ``[job …]`` prefix.
So one ``grep`` (or one log query on ``trace_id``) follows a job through web,
worker and webhook.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time

from config.task_names import RUN_JOB

_JOB: contextvars.ContextVar[dict | None] = contextvars.ContextVar("maskq_job", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(job_prefix)s%(message)s"


@contextlib.contextmanager
def job_context(**fields):
    """Lines logged inside are about this job (``job_id``, ``tenant``, ``model``, ``lane``, ``traceparent``)."""
    token = _JOB.set({**(_JOB.get() or {}), **_fields(fields)})  # a copy: bind_job changes this block's job only
    try:
        yield
    finally:
        _JOB.reset(token)


def bind_job(**fields) -> None:
    """Add fields to the job of the enclosing :func:`job_context` (once its record is read, say)."""
    job = _JOB.get()
    if job is None:
        return
    job.update(_fields(fields))


def _fields(fields: dict) -> dict:
    """The fields given, less the unknown (None) ones, with a ``traceparent`` as its ``trace_id``."""
    traceparent = fields.pop("traceparent", None)
    if traceparent:
        fields["trace_id"] = traceparent.split("-")[1]
    return {k: v for k, v in fields.items() if v is not None}


def current_job() -> dict:
    return dict(_JOB.get() or {})


class JobFilter(logging.Filter):
    """Puts the current job's fields on every record (``record.job``), and a text prefix."""

    def filter(self, record: logging.LogRecord) -> bool:
        job = _JOB.get() or {}
        args = record.args if isinstance(record.args, dict) else {}
        if not job and args.get("name") == RUN_JOB and "id" in args:
            job = {"job_id": args["id"]}  # Celery's own "received" / "succeeded" lines: the task id is the job's
        record.job = job
        record.job_prefix = f"[job {job['job_id']}] " if "job_id" in job else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message, the job's fields, any exception."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "pid": record.process,
            "message": record.getMessage(),
            **getattr(record, "job", {}),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def handler(log_format: str, stream=None) -> logging.Handler:
    """A stream handler in ``log_format`` ("text" or "json") that knows the current job."""
    out = logging.StreamHandler(stream or sys.stderr)
    out.addFilter(JobFilter())
    out.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return out


def configure(settings, stream=None) -> None:
    """The root logger of this process, in the settings' level and format (replacing its handlers)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler(settings.log_format, stream))
    root.setLevel(settings.log_level)
