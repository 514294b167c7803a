"""A small typed client of maskq's HTTP API: ``Client(url, key)``.

    from maskq import Client

    client = Client("http://127.0.0.1:8000", key)
    job = client.segment("photo.png", points=[[360, 280, 1]], model="sam")
    print(job.instances[0]["bbox"], job.instances[0]["score"])

What it does for the caller:

- every submit carries an ``Idempotency-Key`` (a new one per call unless one
  is given), so a retry after a lost answer never makes a second job;
- ``429`` and ``503`` (and ``409``, a submit whose first attempt is still
  being handled) are retried after their ``Retry-After``, a few times;
- a refused request raises :class:`ApiError` with the problem's ``detail``;
- :meth:`Client.wait` follows the job's live events (Server-Sent Events, resumed with
  ``Last-Event-ID`` when a stream is cut), and long-polls where the service refuses a stream;
- :func:`verify_webhook` checks a delivery's Standard Webhooks signature.

It needs ``requests`` and ``standardwebhooks`` only, never the server's code.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Self

import requests
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

ImageInput = str | Path | bytes | BinaryIO
Document = dict[str, Any]  # a JSON object as the API answers it
ENDED = frozenset({"succeeded", "failed", "canceled", "expired"})
RETRIED = frozenset({409, 429, 503})
MAX_SERVER_WAIT_S = 30  # GET /v1/jobs/{id}?wait= takes at most this (MASKQ_MAX_WAIT_S's default)


class ApiError(Exception):
    """The service refused a request: its status and its problem+json body."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        errors: list[Document] | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(f"{status} {title}: {detail}")
        self.status, self.title, self.detail = status, title, detail
        self.errors = errors or []
        self.retry_after = retry_after


@dataclass(frozen=True)
class Resource:
    """Something the API answers with an ``id`` and a ``status``; ``document`` is the whole JSON."""

    id: str
    status: str
    document: Document = field(repr=False)
    ENDED: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_document(cls, document: Document) -> Self:
        return cls(id=document["id"], status=document["status"], document=document)

    @property
    def ended(self) -> bool:
        return self.status in self.ENDED


@dataclass(frozen=True)
class Job(Resource):
    """A job as ``GET /v1/jobs/{id}`` shows it."""

    ENDED: ClassVar[frozenset[str]] = ENDED

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @property
    def result(self) -> Document | None:
        result: Document | None = self.document.get("result")
        return result

    @property
    def instances(self) -> list[Document]:
        """The instances found (mask, bbox, area, score, label); empty until the job succeeded."""
        instances: list[Document] = (self.result or {}).get("instances", [])
        return instances

    @property
    def error(self) -> Document | None:
        error: Document | None = self.document.get("error")
        return error

    @property
    def queue_position(self) -> int | None:
        position: int | None = self.document.get("queue_position")
        return position


@dataclass(frozen=True)
class Batch(Resource):
    """A batch as ``GET /v1/batches/{id}`` shows it."""

    ENDED: ClassVar[frozenset[str]] = frozenset({"completed", "canceled"})

    @property
    def total(self) -> int:
        total: int = self.document["total"]
        return total

    @property
    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = self.document["counts"]
        return counts


@dataclass(frozen=True)
class Event:
    """One event of a live stream (``GET /v1/jobs/{id}/events``, ``/v1/batches/{id}/events``).

    ``event``: ``state``, ``position`` or ``end`` for a job; ``progress`` or ``end`` for a batch.
    ``id``: what to send as ``Last-Event-ID`` to resume after it. ``data``: its JSON (an ``end``'s is
    the final job or batch document).
    """

    event: str
    id: str | None
    data: Document


class Client:
    """maskq's API at ``url`` with API key ``key`` (None: a service with ``MASKQ_AUTH=off``).

    ``retries``: how many times a ``429``/``503``/``409`` or a lost connection is tried again;
    ``timeout``: seconds for one HTTP exchange (a long poll adds its wait).
    """

    def __init__(
        self,
        url: str,
        key: str | None = None,
        *,
        retries: int = 8,
        timeout: float = 30,
        session: requests.Session | None = None,
    ):
        self.url = url.rstrip("/")
        self.retries = retries
        self.timeout = timeout
        self.session = session or requests.Session()
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.session.headers.setdefault("User-Agent", "maskq-client/1")

    # -- jobs -------------------------------------------------------------------------------------
    def segment(
        self,
        image: ImageInput,
        *,
        points: Sequence[Sequence[float]] | None = None,
        boxes: Sequence[Sequence[float]] | None = None,
        text: str | Sequence[str] | None = None,
        mask: Document | None = None,
        model: str | None = None,
        lane: str | None = None,
        outputs: Sequence[str] | None = None,
        webhook: Document | None = None,
        wait: float = 300,
        idempotency_key: str | None = None,
        cancel_after: float | str | None = None,
    ) -> Job:
        """Submit one image and return the job once it has ended (or as it stands after ``wait`` seconds).

        ``text``: objects by name (``text="cup"``: the service's ``objects`` model when ``model`` is None), or,
        with ``model="text-regions"``, text to find written in the image.
        """
        request = build_request(
            points=points, boxes=boxes, text=text, mask=mask, model=model, lane=lane, outputs=outputs, webhook=webhook
        )
        job = self.submit(
            image,
            request,
            prefer_wait=min(wait, MAX_SERVER_WAIT_S),
            idempotency_key=idempotency_key,
            cancel_after=cancel_after,
        )
        return job if job.ended else self.wait(job.id, timeout=wait)

    def submit(
        self,
        image: ImageInput,
        request: Mapping[str, Any] | None = None,
        *,
        prefer_wait: float = 0,
        idempotency_key: str | None = None,
        filename: str | None = None,
        cancel_after: float | str | None = None,
    ) -> Job:
        """Submit a job (``request`` as in API.md) and return it as the service answered.

        ``prefer_wait``: ask the service to hold the answer up to that many seconds for the job to end.
        ``cancel_after``: seconds, or a duration such as ``"5m"``: the service cancels the job if it has not
        ended that long after the submit (error code ``cancel_after``); its ``Cancel-After`` header.
        """
        data, name = read_image(image, filename)
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex, **_cancel_after(cancel_after)}
        if prefer_wait:
            headers["Prefer"] = f"wait={prefer_wait:g}"
        answer = self._call(
            "POST",
            "/v1/jobs",
            headers=headers,
            extra_timeout=prefer_wait,
            files={"image": (name, data)},
            data={"request": json.dumps(dict(request or {}))},
        )
        return Job.from_document(_document(answer))

    def get(self, job_id: str, wait: float = 0) -> Job:
        """The job now, or (``wait`` > 0) once it ends or ``wait`` seconds (at most 30) pass."""
        params = {"wait": f"{min(wait, MAX_SERVER_WAIT_S):g}"} if wait else None
        return Job.from_document(_document(self._call("GET", f"/v1/jobs/{job_id}", params=params, extra_timeout=wait)))

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Until the job ends, following its event stream; after ``timeout`` seconds, the job as it stands.

        Where the service refuses the stream (the key's waits are all in use, an older server), or
        something between cuts it for good, it long-polls instead.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for event in self.events(job_id, timeout=timeout):
                if event.event == "end":
                    return Job.from_document(event.data)
            return self.get(job_id)  # out of time (or the stream had already ended)
        except ApiError as exc:
            # A server without event streams answers 404 for the route: the long poll says if the job is missing.
            if exc.status not in (404, 429, 503):
                raise
        except requests.RequestException:
            pass
        return self._long_poll(job_id, None if deadline is None else max(deadline - time.monotonic(), 0))

    def events(self, job_id: str, *, last_event_id: str | None = None, timeout: float | None = None) -> Iterator[Event]:
        """The job's live events until its ``end`` (the last one), reconnecting with ``Last-Event-ID``.

        ``state`` (the job after each move), ``position`` (a queued job's new place), ``end`` (the final
        job). The server closes a stream now and then (``MASKQ_MAX_STREAM_S``); this carries on from the
        last event seen. Stops after ``timeout`` seconds, or at once if ``last_event_id`` was the end's.
        """
        return self._follow(f"/v1/jobs/{job_id}/events", last_event_id, timeout)

    def batch_events(
        self, batch_id: str, *, last_event_id: str | None = None, timeout: float | None = None
    ) -> Iterator[Event]:
        """The batch's live events: ``progress`` as its jobs end, then ``end`` (the whole batch); as :meth:`events`."""
        return self._follow(f"/v1/batches/{batch_id}/events", last_event_id, timeout)

    def _long_poll(self, job_id: str, timeout: float | None = None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = MAX_SERVER_WAIT_S if deadline is None else deadline - time.monotonic()
            job = self.get(job_id, wait=max(min(left, MAX_SERVER_WAIT_S), 0))
            if job.ended or (deadline is not None and time.monotonic() >= deadline):
                return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job; an ended one raises :class:`ApiError` 409."""
        return Job.from_document(_document(self._call("DELETE", f"/v1/jobs/{job_id}")))

    def file(self, job_id: str, name: str) -> bytes:
        """One of the job's files, e.g. ``masks/0.png``."""
        return self._call("GET", f"/v1/jobs/{job_id}/files/{name}").content

    def models(self) -> list[Document]:
        models: list[Document] = _document(self._call("GET", "/v1/models"))["models"]
        return models

    # -- batches ------------------------------------------------------------------------------------
    def submit_batch(
        self,
        images: Iterable[ImageInput] | None = None,
        request: Mapping[str, Any] | None = None,
        *,
        archive: ImageInput | None = None,
        prompts: Mapping[str, Document] | None = None,
        names: Sequence[str] | None = None,
        idempotency_key: str | None = None,
        cancel_after: float | str | None = None,
    ) -> Batch:
        """Many images in one request (or one zip/tar ``archive``), fanned out into jobs on the batch lane.

        ``names``: the images' file names (default: a path's name); they label the results and must be unique.
        ``prompts``: per-image prompts by file name, overriding ``request["prompts"]`` for that image.
        ``cancel_after``: as for :meth:`submit`, for each job of the batch.
        """
        files: list[tuple[str, tuple[str, bytes]]] = []
        for number, image in enumerate(images or ()):
            data, name = read_image(image, names[number] if names else None)
            files.append(("images", (name, data)))
        if archive is not None:
            data, name = read_image(archive)
            files.append(("archive", (name, data)))
        form = {"request": json.dumps(dict(request or {}))}
        if prompts:
            form["prompts"] = json.dumps(dict(prompts))
        answer = self._call(
            "POST",
            "/v1/batches",
            files=files,
            data=form,
            extra_timeout=120,
            headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex, **_cancel_after(cancel_after)},
        )
        return Batch.from_document(_document(answer))

    def get_batch(self, batch_id: str) -> Batch:
        return Batch.from_document(_document(self._call("GET", f"/v1/batches/{batch_id}")))

    def wait_batch(
        self,
        batch_id: str,
        timeout: float | None = None,
        poll_s: float = 1.0,
        progress: Callable[[Batch], object] | None = None,
    ) -> Batch:
        """Poll until every job of the batch has ended; ``progress(batch)`` is called after each poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self.get_batch(batch_id)
            if progress is not None:
                progress(batch)
            if batch.ended or (deadline is not None and time.monotonic() >= deadline):
                return batch
            time.sleep(poll_s)

    def batch_coco(self, batch_id: str) -> Document:
        """The batch's finished results as COCO JSON (images, annotations with RLE masks, categories)."""
        return _document(self._call("GET", f"/v1/batches/{batch_id}/coco", extra_timeout=60))

    def cancel_batch(self, batch_id: str) -> Batch:
        """Cancel every job of the batch that has not ended."""
        return Batch.from_document(_document(self._call("DELETE", f"/v1/batches/{batch_id}")))

    # -- event streams ------------------------------------------------------------------------------
    def _follow(self, path: str, last_event_id: str | None, timeout: float | None) -> Iterator[Event]:
        deadline = None if timeout is None else time.monotonic() + timeout
        failures = 0
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            parser = EventStreamParser()
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_event_id} if last_event_id else {})}
            try:
                # The read timeout outlasts the server's heartbeats (a comment every 15 s by default).
                with self.session.get(
                    self.url + path,
                    headers=headers,
                    stream=True,
                    timeout=(self.timeout, min(self.timeout, left or self.timeout)),
                ) as answer:
                    if answer.status_code == 204:  # last_event_id was the end's: nothing more comes
                        return
                    if answer.status_code >= 400:
                        raise _api_error(answer)
                    for chunk in answer.iter_content(chunk_size=None):  # as the server writes it
                        for name, event_id, data in parser.feed(chunk):
                            last_event_id, failures = event_id or last_event_id, 0
                            event = Event(name, event_id, json.loads(data))
                            yield event
                            if event.event == "end":
                                return
            except requests.RequestException:
                # A dropped connection, or a read that timed out: carry on from the last event seen.
                failures += 1
                if deadline is not None and time.monotonic() >= deadline:
                    return
                if failures > self.retries:
                    raise
            # The server closed the stream (its longest time) or the connection dropped: reconnect, as
            # an EventSource does, after the delay the server asked for.
            time.sleep(min(parser.retry_ms / 1000, 5) if failures <= 1 else min(2**failures * 0.25, 5))

    # -- HTTP ---------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, *, extra_timeout: float = 0, **kwargs: Any) -> requests.Response:
        """One request, retried while the service says "later" (or the connection drops); errors raised."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                answer = self.session.request(method, self.url + path, timeout=self.timeout + extra_timeout, **kwargs)
            except requests.ConnectionError:
                # Safe to repeat: reads, cancels, and submits that carry an Idempotency-Key.
                if last:
                    raise
                time.sleep(min(2**attempt * 0.25, 5))
                continue
            if answer.status_code in RETRIED and not last:
                time.sleep(retry_after_s(answer.headers.get("Retry-After"), default=min(2**attempt * 0.25, 5)))
                continue
            if answer.status_code >= 400:
                raise _api_error(answer)
            return answer
        raise AssertionError("unreachable")  # the last attempt returns or raises


def build_request(
    *,
    points: Sequence[Sequence[float]] | None = None,
    boxes: Sequence[Sequence[float]] | None = None,
    text: str | Sequence[str] | None = None,
    mask: Document | None = None,
    model: str | None = None,
    lane: str | None = None,
    outputs: Sequence[str] | None = None,
    webhook: Document | None = None,
) -> Document:
    """A job request (API.md) from keyword arguments; what is None is left out."""
    prompts: dict[str, Any] = {}
    if points:
        prompts["points"] = [list(p) for p in points]
    if boxes:
        prompts["boxes"] = [list(b) for b in boxes]
    if text:
        prompts["text"] = [text] if isinstance(text, str) else list(text)
    if mask:
        prompts["mask"] = mask
    request: dict[str, Any] = {"prompts": prompts} if prompts else {}
    request |= {
        name: value for name, value in (("model", model), ("lane", lane), ("webhook", webhook)) if value is not None
    }
    if outputs is not None:
        request["outputs"] = list(outputs)
    return request


def read_image(image: ImageInput, filename: str | None = None) -> tuple[bytes, str]:
    """``(bytes, file name)`` of a path, bytes, or an open binary file."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        return path.read_bytes(), filename or path.name
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), filename or "image"
    return image.read(), filename or Path(getattr(image, "name", "image")).name


def _cancel_after(value: float | str | None) -> dict[str, str]:
    """The ``Cancel-After`` header for ``value`` (seconds, or a duration string as the service reads it)."""
    if value is None:
        return {}
    return {"Cancel-After": value if isinstance(value, str) else f"{float(value):.3f}".rstrip("0").rstrip(".")}


class EventStreamParser:
    """The text/event-stream format (WHATWG HTML, "Server-sent events"), fed bytes as they come.

    :meth:`feed` returns the events completed so far as ``(event type, last event id, data)``;
    comments (heartbeats) and events without data are dropped, as an EventSource drops them.
    """

    _LINE_END = re.compile(rb"\r\n|\r|\n")

    def __init__(self) -> None:
        self.retry_ms = 1000
        self.last_id: str | None = None
        self._buffer = b""
        self._type = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[tuple[str, str | None, str]]:
        self._buffer += chunk
        events = []
        while (found := self._LINE_END.search(self._buffer)) is not None:
            if found.group() == b"\r" and found.end() == len(self._buffer):
                break  # maybe the first half of a CRLF
            line = self._buffer[: found.start()].decode("utf-8", "replace")
            self._buffer = self._buffer[found.end() :]
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> tuple[str, str | None, str] | None:
        if not line:  # a blank line ends an event
            data, kind = self._data, self._type or "message"
            self._data, self._type = [], ""
            return (kind, self.last_id, "\n".join(data)) if data else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None


def retry_after_s(value: str | None, default: float = 1.0) -> float:
    """``Retry-After`` (delta-seconds or an HTTP date) as seconds to sleep, capped at a minute."""
    if not value:
        return default
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return default
    return min(max(seconds, 0.0), 60.0)


def verify_webhook(body: bytes | str, headers: Mapping[str, str], secret: str) -> Document:
    """The event's JSON if its Standard Webhooks signature (``webhook-id``, ``-timestamp``,
    ``-signature``) is the tenant secret's (``whsec_…``) and recent; raises :class:`WebhookVerificationError`."""
    lowered = {k.lower(): v for k, v in headers.items()}
    event: Document = Webhook(secret).verify(body, lowered)
    return event


def _document(answer: requests.Response) -> Document:
    """The answer's JSON object (the API answers every request with one)."""
    document: Document = answer.json()
    return document


def _api_error(answer: requests.Response) -> ApiError:
    try:
        problem = answer.json()
    except ValueError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    retry_after = answer.headers.get("Retry-After")
    return ApiError(
        answer.status_code,
        problem.get("title", answer.reason or ""),
        problem.get("detail", answer.text[:500]),
        problem.get("errors"),
        retry_after_s(retry_after) if retry_after else None,
    )


__all__ = [
    "ApiError",
    "Batch",
    "Client",
    "Event",
    "EventStreamParser",
    "Job",
    "WebhookVerificationError",
    "build_request",
    "verify_webhook",
]
