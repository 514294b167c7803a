"""Live progress as Server-Sent Events: ``GET /v1/jobs/{id}/events`` and ``GET /v1/batches/{id}/events``.

Each is a ``text/event-stream`` (WHATWG HTML, "Server-sent events") that ends with the job's (or
batch's) final document, after which the server closes it.

A job's stream:

- ``state``, id ``m``: the job's document after its m-th state move (0: as submitted), sent once
  per move (queued, running, queued again after a lost worker, …);
- ``position``, id ``m.k``: ``{status, queue_position, estimated_start_at}`` each time a queued
  job's place changes (k counts them within move m);
- ``end``, id ``m``: the ended job's document, result included; then the stream closes.

A batch's stream: ``progress`` (the batch without its job list) each time a job of it ends or the
batch's status moves, and ``end`` with the whole batch document. Its ids are ``{done}-{status}``:
the jobs ended so far and the batch's status, both of which only grow.

Resuming: ids only grow, per job (the transition script counts a job's moves, stores/jobs.py)
and per batch. A client that reconnects with ``Last-Event-ID`` gets what is newer than that id,
never an event it saw: the current state if the job moved since (moves it missed in between are
not replayed: the next event carries the state it is in now), else only later changes; one that saw
the end gets ``204 No Content`` (which tells an EventSource to stop reconnecting).

Bounds: a stream holds a web thread, as a long poll does, so it takes one of the key's
``MASKQ_MAX_WAITS_PER_KEY`` wait slots (webapp/waits.py; past them a 429 with Retry-After), and a
web process gives streams at most half its threads (past that a 503). The server closes a stream
after ``MASKQ_MAX_STREAM_S`` (the client reconnects with ``Last-Event-ID``) and writes a comment
every ``MASKQ_STREAM_HEARTBEAT_S`` so that proxies keep an idle stream open. Waiting is the long
poll's (``JobStore.wait_until_ended``): a subscription to the job's move channel, with a re-read
each second while the job is queued (its place moves when jobs ahead start, which its channel
does not tell).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import redis
from flask import Blueprint, Response, current_app, request, stream_with_context

from domain import keys
from domain.batches import document as batch_document
from domain.errors import InputError, NotFound, ServiceUnavailable, TooManyRequests
from domain.records import JobState
from webapp.batches import batches, load_batch
from webapp.jobs import job_view, load_job
from webapp.limits import client_id
from webapp.services import services
from webapp.waits import wait_slot

bp = Blueprint("events", __name__)

log = logging.getLogger(__name__)

MEDIA_TYPE = "text/event-stream"
RETRY_MS = 1000  # how long an EventSource waits before it reconnects (the SSE "retry" field)
QUEUED_RECHECK_S = 1.0  # a queued job's place changes without a move on its channel
RECHECK_S = 5.0  # otherwise the channel wakes the stream; a re-read now and then in case Redis dropped one
BATCH_MIN_GAP_S = 0.5  # a batch whose jobs end many a second sends one progress event per this
BATCH_RANKS = {"receiving": 0, "running": 1, "canceling": 2, "completed": 3, "canceled": 3}
_JOB_ID = re.compile(r"(\d{1,9})(?:\.(\d{1,9}))?")
_BATCH_ID = re.compile(r"(\d{1,9})-([a-z]{1,12})")


@dataclass(frozen=True, order=True)
class JobEventId:
    """Where a job's stream stands: its ``move``-th state, and the ``tick``-th change of place within it."""

    move: int
    tick: int = 0

    def __str__(self) -> str:
        return f"{self.move}.{self.tick}" if self.tick else str(self.move)

    @classmethod
    def parse(cls, text: str) -> JobEventId:
        found = _JOB_ID.fullmatch(text.strip())
        if found is None:
            raise _bad_last_event_id(text, "a job's event ids are 'm' or 'm.k' (numbers)")
        return cls(int(found[1]), int(found[2] or 0))


@dataclass(frozen=True)
class BatchEventId:
    """Where a batch's stream stands: ``done`` jobs ended, the batch ``status``; ordered by both."""

    done: int
    status: str

    def __str__(self) -> str:
        return f"{self.done}-{self.status}"

    @property
    def order(self) -> tuple[int, int]:
        return self.done, BATCH_RANKS[self.status]

    @classmethod
    def parse(cls, text: str) -> BatchEventId:
        found = _BATCH_ID.fullmatch(text.strip())
        if found is None or found[2] not in BATCH_RANKS:
            raise _bad_last_event_id(text, "a batch's event ids are '{done}-{status}'")
        return cls(int(found[1]), found[2])


def sse(event_id: object, event: str, data: dict) -> str:
    """One event in the text/event-stream format (one ``data`` line: compact JSON has no newline)."""
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


HEARTBEAT = ": keep-alive\n\n"  # a comment line: clients ignore it, proxies see traffic


@bp.record_once
def _set_up(state) -> None:
    # Half of each process's threads at most: the rest answer probes and short requests however
    # many keys hold streams (gthread runs one request per thread; webapp/gunicorn_conf.py).
    threads = state.app.extensions["maskq"].settings.web_threads
    state.app.extensions["maskq.streams"] = threading.BoundedSemaphore(max(1, threads // 2))


@bp.get("/v1/jobs/<job_id>/events")
def job_events(job_id: str):
    record = load_job(job_id)  # 404 for an unknown id or another tenant's job
    seen = _last_event_id(JobEventId.parse)
    if seen is not None and seen.move > record.moves:
        raise _bad_last_event_id(str(seen), f"job {job_id} has made {record.moves} moves")
    if record.status.ended and seen is not None and seen.move == record.moves:
        return Response(status=204)  # the client saw the end
    return _stream(_follow_job(job_id, seen))


@bp.get("/v1/batches/<batch_id>/events")
def batch_events(batch_id: str):
    batch = load_batch(batch_id)  # 404 for an unknown id or another tenant's batch
    seen = _last_event_id(BatchEventId.parse)
    if seen is not None:
        store = batches()
        now = _batch_event_id(batch, store.statuses([job_id for job_id, _ in store.job_entries(batch.id)]))
        if seen.order > now.order:
            raise _bad_last_event_id(str(seen), f"batch {batch_id} stands at {now}")
        if batch.completed_at is not None and seen.order == now.order:
            return Response(status=204)
    return _stream(_follow_batch(batch_id, seen))


def _stream(events: Iterator[str]) -> Response:
    """The streaming answer, once the key's wait slot and a stream thread are taken (else 429 / 503)."""
    s = services()
    held = contextlib.ExitStack()
    if not held.enter_context(wait_slot(s.redis, client_id(), s.settings.max_stream_s, s.settings.max_waits_per_key)):
        held.close()
        raise TooManyRequests(
            f"this key already holds {s.settings.max_waits_per_key} waiting requests and event "
            "streams (MASKQ_MAX_WAITS_PER_KEY); retry when one of them ends",
            retry_after=5,
        )
    threads = current_app.extensions["maskq.streams"]
    if not threads.acquire(blocking=False):
        held.close()
        raise ServiceUnavailable(
            "this server holds as many event streams as it can; retry shortly, or poll", retry_after=5
        )
    held.callback(threads.release)
    response = Response(stream_with_context(_until_redis_fails(events)), mimetype=MEDIA_TYPE)
    # Released when the server closes the answer: at its end, or once a write finds the client gone
    # (a heartbeat at the latest), even if the stream never started.
    response.call_on_close(held.close)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on as it comes
    return response


def _until_redis_fails(events: Iterator[str]) -> Iterator[str]:
    # Headers are out: a 503 cannot be sent any more. Closing lets the client reconnect and get the usual answer.
    try:
        yield from events
    except redis.RedisError as exc:
        log.info("event stream closed: Redis is unavailable (%s)", exc)


def _follow_job(job_id: str, seen: JobEventId | None) -> Iterator[str]:
    s = services()
    with _Wakeups(s) as wake:
        wake.listen([job_id])
        yield wake.sent(f"retry: {RETRY_MS}\n\n")  # sends the headers at once
        place = None  # the queue position this connection last sent
        while True:
            try:
                record = load_job(job_id)
            except NotFound:  # removed under the stream (retention): a reconnect gets the 404
                return
            if record.status.ended:
                if seen is None or record.moves > seen.move:
                    yield wake.sent(sse(JobEventId(record.moves), "end", job_view(record)))
                return
            if seen is None or record.moves > seen.move:
                seen = JobEventId(record.moves)
                doc = job_view(record)
                place = doc.get("queue_position")
                yield wake.sent(sse(seen, "state", doc))
            elif record.status == JobState.QUEUED:
                doc = job_view(record)
                if doc.get("queue_position") is not None and doc["queue_position"] != place:
                    seen, place = JobEventId(seen.move, seen.tick + 1), doc["queue_position"]
                    yield wake.sent(
                        sse(
                            seen,
                            "position",
                            {
                                "status": doc["status"],
                                "queue_position": place,
                                "estimated_start_at": doc.get("estimated_start_at"),
                            },
                        )
                    )
            if not (yield from wake.pause(QUEUED_RECHECK_S if record.status == JobState.QUEUED else RECHECK_S)):
                return


def _follow_batch(batch_id: str, seen: BatchEventId | None) -> Iterator[str]:
    s = services()
    store = batches()
    base_url = s.settings.public_url or request.host_url
    with _Wakeups(s) as wake:
        yield wake.sent(f"retry: {RETRY_MS}\n\n")
        while True:
            try:
                batch = load_batch(batch_id)
            except NotFound:
                return
            entries = store.job_entries(batch.id)
            statuses = store.statuses([job_id for job_id, _ in entries])
            wake.listen([job_id for (job_id, _), status in zip(entries, statuses) if not JobState(status).ended])
            now = _batch_event_id(batch, statuses)
            news = seen is None or now.order > seen.order
            if batch.completed_at is not None:
                if news:
                    yield wake.sent(sse(now, "end", batch_document(batch, entries, statuses, base_url)))
                return
            if news:
                seen = now
                doc = batch_document(batch, entries, statuses, base_url)
                yield wake.sent(sse(now, "progress", {k: v for k, v in doc.items() if k not in ("jobs", "rejected")}))
            # Many jobs ending at once: one re-read for all of them, not one each.
            if not (yield from wake.pause(RECHECK_S, at_least=BATCH_MIN_GAP_S)):
                return


def _batch_event_id(batch, statuses: list[str]) -> BatchEventId:
    return BatchEventId(sum(JobState(status).ended for status in statuses), batch.status)


class _Wakeups:
    """What a stream waits on: the move channels of the jobs it follows, its heartbeat, its end of life."""

    def __init__(self, s):
        self.pubsub = s.redis.pubsub(ignore_subscribe_messages=True)
        self.heartbeat_s = s.settings.stream_heartbeat_s
        self.closes_at = time.monotonic() + s.settings.max_stream_s
        self.last_write = time.monotonic()
        self.channels: set[str] = set()

    def __enter__(self) -> _Wakeups:
        return self

    def __exit__(self, *exc) -> None:
        self.pubsub.close()

    def listen(self, job_ids: list[str]) -> None:
        new = {keys.job_events(job_id) for job_id in job_ids} - self.channels
        if new:
            self.pubsub.subscribe(*new)  # before the caller's next read, so no move falls in between
            self.channels |= new

    def sent(self, text: str) -> str:
        """``text``, noted as written now (a heartbeat is due only after ``heartbeat_s`` of silence)."""
        self.last_write = time.monotonic()
        return text

    def pause(self, most_s: float, at_least: float = 0.0) -> Generator[str, None, bool]:
        """Wait until a move is published (and ``at_least`` has passed) or ``most_s`` pass; heartbeats meanwhile.

        A generator to ``yield from`` (it yields the heartbeats): its value is False once the stream's
        time is up (the client reconnects with ``Last-Event-ID``).
        """
        begun = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= self.closes_at:
                return False
            if now - begun >= most_s:
                return True
            if now - self.last_write >= self.heartbeat_s:
                yield self.sent(HEARTBEAT)
            wait = max(min(begun + most_s, self.closes_at, self.last_write + self.heartbeat_s) - now, 0.0)
            if not self.channels:
                time.sleep(wait)
            elif self.pubsub.get_message(timeout=wait) is not None:
                # Moves that come on its heels are read together with it.
                while (left := begun + at_least - time.monotonic()) > 0:
                    self.pubsub.get_message(timeout=left)
                return True


def _last_event_id(parse):
    raw = request.headers.get("Last-Event-ID")
    return parse(raw) if raw and raw.strip() else None


def _bad_last_event_id(text: str, why: str) -> InputError:
    return InputError(
        f"Last-Event-ID {text[:40]!r} is not an id of this stream: {why}",
        errors=[{"field": "Last-Event-ID", "message": why}],
    )
