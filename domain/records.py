"""The service's own job record and its states: what the service knows about one job.

Celery's result state cannot tell "pending" from "unknown id", so the record
is the truth about a job. It is kept as a Redis hash of strings
(:meth:`JobRecord.to_hash`, :meth:`JobRecord.from_hash`); the store that keeps
and moves it is ``stores/jobs.py``, and the job as clients see it is
``domain/documents.py``.
"""

from __future__ import annotations

import json
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from domain.schemas import JobRequest


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"

    @property
    def ended(self) -> bool:
        return self in ENDED


ENDED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED, JobState.EXPIRED})


class StoredRequest:
    """``JobRecord.request``: the job's typed :class:`JobRequest`, parsed from the record at most once.

    The web parses a submission once and gives the record the :class:`JobRequest` itself. A record read from
    Redis holds the request's JSON as stored, and turns it into the typed request the first time it is
    asked for (a record read only to show its status never parses it); that object is kept, so every later
    reader (job runner, pipeline, adapter) gets the same one. A dict (a record built by hand, the form of
    the request the previous version kept) is taken too. Written back, a request never parsed is its own
    text, byte for byte, and a typed one is ``json.dumps(model_dump(mode="json"))``: the stored form the
    previous version wrote and read, and that the transition script's webhook step reads (stores/outbox.py).
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, record: JobRecord | None, owner: type | None = None) -> JobRequest:
        if record is None:
            return EMPTY_REQUEST  # the dataclass field's default
        value = record.__dict__[self.slot]
        if not isinstance(value, JobRequest):
            value = (
                JobRequest.model_validate_json(value)
                if isinstance(value, (str, bytes))
                else JobRequest.model_validate(value)
            )
            record.__dict__[self.slot] = value
        return value

    def __set__(self, record: JobRecord, value: JobRequest | dict[str, Any] | str) -> None:
        record.__dict__[self.slot] = value

    def stored(self, record: JobRecord) -> str:
        """The request as the record's hash keeps it."""
        value = record.__dict__[self.slot]
        if isinstance(value, str):
            return value
        if isinstance(value, JobRequest):
            value = value.model_dump(mode="json")
        return json.dumps(value)


EMPTY_REQUEST = JobRequest()


@dataclass
class JobRecord:
    """What the service knows about one job; ``request`` is its typed request (:class:`StoredRequest`)."""

    id: str
    tenant: str
    lane: str
    model: str
    input_key: str
    image_sha256: str
    width: int
    height: int
    request: JobRequest = StoredRequest()  # type: ignore[assignment]  # a descriptor that reads as a JobRequest
    status: JobState = JobState.QUEUED
    model_version: str = ""
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    result_key: str | None = None
    instances: int | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    cached: bool = False
    deadline_at: float | None = None
    last_error: dict[str, Any] | None = None
    # Set when the requested model could not be loaded and its fallback ran the job instead:
    # {"name", "version", "reason"} of the model actually used (models/catalog.py, ModelChoice).
    model_used: dict[str, Any] | None = None
    # The result cache's digest of this job (stores/result_cache.py), and the identical job in flight
    # whose result this one waits for, or took (a coalesced job).
    cache_key: str | None = None
    coalesced_with: str | None = None
    # The pool process ("host:pid", as in stores/fleet.py) that started the job's latest run.
    worker: str | None = None
    # When it last went back on its lane (out of memory, a lost worker): its queue wait counts from here.
    requeued_at: float | None = None
    # Seconds the run that succeeded spent in each phase (queue, load, encode, predict, store, total).
    timings: dict[str, float] | None = None
    # The W3C trace context the job carries through web, worker and webhook (its traceparent).
    traceparent: str | None = None
    # The batch the job is one image of (POST /v1/batches), if any.
    batch: str | None = None
    # When the job is canceled unless it has ended (its Cancel-After: domain/cancel_after.py).
    cancel_at: float | None = None
    # How many state moves the job has made (the transition script counts them): its event ids.
    moves: int = 0
    # What the job's input is: "image" (a record written before this field is one) or "video".
    # Its result is written by that media's writer (workers/results.py; a video's: workers/video_job.py).
    media: str = "image"
    # A video job's progress: the frames it takes (counted when the clip was checked at submission) and
    # those whose results are stored; and its stored chunks, in order, each ``{"start", "end", "frames",
    # "attempt", "key"}`` (frames ``start`` to ``end - 1`` of the clip, computed by run ``attempt``):
    # a run that follows a dead one starts after the last of them (workers/video_job.py).
    frames_total: int | None = None
    frames_done: int | None = None
    chunks: list[dict[str, Any]] | None = None

    # Kept as JSON in the hash (a bool too, as JSON's true/false); every other field as its str().
    JSON_FIELDS: ClassVar[tuple[str, ...]] = ("request", "error", "last_error", "model_used", "timings", "chunks")

    def to_hash(self) -> dict[str, str]:
        out = {}
        for key in self.__dataclass_fields__:
            if key == "request":
                out[key] = type(self).__dict__["request"].stored(self)
                continue
            value = getattr(self, key)
            if value is None:
                continue
            out[key] = json.dumps(value) if key in self.JSON_FIELDS or isinstance(value, bool) else str(value)
        return out

    @classmethod
    def submitted(
        cls,
        job_id: str,
        request: JobRequest,
        *,
        tenant: str,
        lane: str,
        model: str,
        model_version: str,
        cancel_after: float | None,
        **fields: Any,
    ) -> JobRecord:
        """A new job's record (an image's or a clip's): created now, its deadline and Cancel-After counted from
        now, and its request as it will run (the model and lane chosen for it filled in)."""
        now = time.time()
        return cls(
            id=job_id,
            tenant=tenant,
            lane=lane,
            model=model,
            model_version=model_version,
            created_at=now,
            deadline_at=now + request.deadline_s if request.deadline_s else None,
            cancel_at=now + cancel_after if cancel_after else None,
            request=request.model_copy(update={"model": model, "lane": lane}),
            **fields,
        )

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> JobRecord:
        """A record from its hash, each field turned back into its declared type (:data:`_CONVERTERS`)."""
        data = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(**{name: convert(data[name]) for name, convert in _CONVERTERS.items() if name in data})

    def metrics(self) -> dict[str, float]:
        """Seconds per phase, as Replicate's ``metrics.predict_time``: ``queue`` once started, ``total`` once
        ended, and for a job that ran to success ``load``, ``encode`` (SAM-family), ``predict``, ``store``."""
        out = dict(self.timings or {})
        if self.started_at is not None:
            out["queue"] = round(self.started_at - (self.requeued_at or self.created_at), 4)
        if self.finished_at is not None:
            out["total"] = round(self.finished_at - self.created_at, 4)
        return out


def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _optional_of(hint: object) -> object:
    """``X`` of ``X | None``; any other type as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _converter(name: str, hint: object) -> Callable[[str], Any]:
    """How field ``name``, declared ``hint``, is read back from its stored string (the reverse of ``to_hash``)."""
    if name == "request":
        return str  # kept as stored, parsed when first asked for (StoredRequest)
    kind = _optional_of(hint)
    if name in JobRecord.JSON_FIELDS or kind is bool:
        return json.loads
    if kind in (int, float, str) or (isinstance(kind, type) and issubclass(kind, StrEnum)):
        return typing.cast(Callable[[str], Any], kind)
    raise TypeError(f"JobRecord.{name}: no way to read a {hint!r} back from its hash")


# One converter per field, chosen once from the fields' real (resolved) types.
_HINTS = typing.get_type_hints(JobRecord)
_CONVERTERS: dict[str, Callable[[str], Any]] = {f.name: _converter(f.name, _HINTS[f.name]) for f in fields(JobRecord)}
