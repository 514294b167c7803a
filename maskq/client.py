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
- :func:`verify_webhook` checks a delivery's Standard Webhooks signature.

It needs ``requests`` and ``standardwebhooks`` only, never the server's code.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Iterable, Mapping, Sequence, Union

import requests
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

ImageInput = Union[str, Path, bytes, BinaryIO]
ENDED = frozenset({"succeeded", "failed", "canceled", "expired"})
RETRIED = frozenset({409, 429, 503})
MAX_SERVER_WAIT_S = 30  # GET /v1/jobs/{id}?wait= takes at most this (MASKQ_MAX_WAIT_S's default)


class ApiError(Exception):
    """The service refused a request: its status and its problem+json body."""

    def __init__(self, status: int, title: str, detail: str, errors: list[dict] | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{status} {title}: {detail}")
        self.status, self.title, self.detail = status, title, detail
        self.errors = errors or []
        self.retry_after = retry_after


@dataclass(frozen=True)
class Resource:
    """Something the API answers with an ``id`` and a ``status``; ``document`` is the whole JSON."""

    id: str
    status: str
    document: dict = field(repr=False)
    ENDED: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_document(cls, document: dict):
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
    def result(self) -> dict | None:
        return self.document.get("result")

    @property
    def instances(self) -> list[dict]:
        """The instances found (mask, bbox, area, score, label); empty until the job succeeded."""
        return (self.result or {}).get("instances", [])

    @property
    def error(self) -> dict | None:
        return self.document.get("error")

    @property
    def queue_position(self) -> int | None:
        return self.document.get("queue_position")


@dataclass(frozen=True)
class Batch(Resource):
    """A batch as ``GET /v1/batches/{id}`` shows it."""

    ENDED: ClassVar[frozenset[str]] = frozenset({"completed", "canceled"})

    @property
    def total(self) -> int:
        return self.document["total"]

    @property
    def counts(self) -> dict[str, int]:
        return self.document["counts"]


class Client:
    """maskq's API at ``url`` with API key ``key`` (None: a service with ``MASKQ_AUTH=off``).

    ``retries``: how many times a ``429``/``503``/``409`` or a lost connection is tried again;
    ``timeout``: seconds for one HTTP exchange (a long poll adds its wait).
    """

    def __init__(self, url: str, key: str | None = None, *, retries: int = 8, timeout: float = 30,
                 session: requests.Session | None = None):
        self.url = url.rstrip("/")
        self.retries = retries
        self.timeout = timeout
        self.session = session or requests.Session()
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.session.headers.setdefault("User-Agent", "maskq-client/1")

    # -- jobs -------------------------------------------------------------------------------------
    def segment(self, image: ImageInput, *, points: Sequence[Sequence[float]] | None = None,
                boxes: Sequence[Sequence[float]] | None = None, text: str | Sequence[str] | None = None,
                mask: dict | None = None, model: str | None = None, lane: str | None = None,
                outputs: Sequence[str] | None = None, webhook: dict | None = None, wait: float = 300,
                idempotency_key: str | None = None) -> Job:
        """Submit one image and return the job once it has ended (or as it stands after ``wait`` seconds)."""
        request = build_request(points=points, boxes=boxes, text=text, mask=mask, model=model, lane=lane,
                                outputs=outputs, webhook=webhook)
        job = self.submit(image, request, prefer_wait=min(wait, MAX_SERVER_WAIT_S), idempotency_key=idempotency_key)
        return job if job.ended else self.wait(job.id, timeout=wait)

    def submit(self, image: ImageInput, request: Mapping[str, Any] | None = None, *, prefer_wait: float = 0,
               idempotency_key: str | None = None, filename: str | None = None) -> Job:
        """Submit a job (``request`` as in API.md) and return it as the service answered.

        ``prefer_wait``: ask the service to hold the answer up to that many seconds for the job to end.
        """
        data, name = read_image(image, filename)
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        if prefer_wait:
            headers["Prefer"] = f"wait={prefer_wait:g}"
        answer = self._call("POST", "/v1/jobs", headers=headers, extra_timeout=prefer_wait,
                            files={"image": (name, data)}, data={"request": json.dumps(dict(request or {}))})
        return Job.from_document(answer.json())

    def get(self, job_id: str, wait: float = 0) -> Job:
        """The job now, or (``wait`` > 0) once it ends or ``wait`` seconds (at most 30) pass."""
        params = {"wait": f"{min(wait, MAX_SERVER_WAIT_S):g}"} if wait else None
        return Job.from_document(self._call("GET", f"/v1/jobs/{job_id}", params=params, extra_timeout=wait).json())

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Long-poll until the job ends; after ``timeout`` seconds, the job as it stands."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = MAX_SERVER_WAIT_S if deadline is None else deadline - time.monotonic()
            job = self.get(job_id, wait=max(min(left, MAX_SERVER_WAIT_S), 0))
            if job.ended or (deadline is not None and time.monotonic() >= deadline):
                return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job; an ended one raises :class:`ApiError` 409."""
        return Job.from_document(self._call("DELETE", f"/v1/jobs/{job_id}").json())

    def file(self, job_id: str, name: str) -> bytes:
        """One of the job's files, e.g. ``masks/0.png``."""
        return self._call("GET", f"/v1/jobs/{job_id}/files/{name}").content

    def models(self) -> list[dict]:
        return self._call("GET", "/v1/models").json()["models"]

    # -- batches ------------------------------------------------------------------------------------
    def submit_batch(self, images: Iterable[ImageInput] | None = None, request: Mapping[str, Any] | None = None, *,
                     archive: ImageInput | None = None, prompts: Mapping[str, dict] | None = None,
                     names: Sequence[str] | None = None, idempotency_key: str | None = None) -> Batch:
        """Many images in one request (or one zip/tar ``archive``), fanned out into jobs on the batch lane.

        ``names``: the images' file names (default: a path's name); they label the results and must be unique.
        ``prompts``: per-image prompts by file name, overriding ``request["prompts"]`` for that image.
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
        answer = self._call("POST", "/v1/batches", files=files, data=form, extra_timeout=120,
                            headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex})
        return Batch.from_document(answer.json())

    def get_batch(self, batch_id: str) -> Batch:
        return Batch.from_document(self._call("GET", f"/v1/batches/{batch_id}").json())

    def wait_batch(self, batch_id: str, timeout: float | None = None, poll_s: float = 1.0, progress=None) -> Batch:
        """Poll until every job of the batch has ended; ``progress(batch)`` is called after each poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self.get_batch(batch_id)
            if progress is not None:
                progress(batch)
            if batch.ended or (deadline is not None and time.monotonic() >= deadline):
                return batch
            time.sleep(poll_s)

    def batch_coco(self, batch_id: str) -> dict:
        """The batch's finished results as COCO JSON (images, annotations with RLE masks, categories)."""
        return self._call("GET", f"/v1/batches/{batch_id}/coco", extra_timeout=60).json()

    def cancel_batch(self, batch_id: str) -> Batch:
        """Cancel every job of the batch that has not ended."""
        return Batch.from_document(self._call("DELETE", f"/v1/batches/{batch_id}").json())

    # -- HTTP ---------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, *, extra_timeout: float = 0, **kwargs) -> requests.Response:
        """One request, retried while the service says "later" (or the connection drops); errors raised."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                answer = self.session.request(method, self.url + path, timeout=self.timeout + extra_timeout, **kwargs)
            except requests.ConnectionError:
                # Safe to repeat: reads, cancels, and submits that carry an Idempotency-Key.
                if last:
                    raise
                time.sleep(min(2 ** attempt * 0.25, 5))
                continue
            if answer.status_code in RETRIED and not last:
                time.sleep(retry_after_s(answer.headers.get("Retry-After"), default=min(2 ** attempt * 0.25, 5)))
                continue
            if answer.status_code >= 400:
                raise _api_error(answer)
            return answer
        raise AssertionError("unreachable")  # the last attempt returns or raises


def build_request(*, points=None, boxes=None, text=None, mask=None, model=None, lane=None, outputs=None,
                  webhook=None) -> dict:
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
    for name, value in (("model", model), ("lane", lane), ("webhook", webhook)):
        if value is not None:
            request[name] = value
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


def verify_webhook(body: bytes | str, headers: Mapping[str, str], secret: str) -> dict:
    """The event's JSON if its Standard Webhooks signature (``webhook-id``, ``-timestamp``,
    ``-signature``) is the tenant secret's (``whsec_…``) and recent; raises :class:`WebhookVerificationError`."""
    lowered = {k.lower(): v for k, v in headers.items()}
    return Webhook(secret).verify(body, lowered)


def _api_error(answer: requests.Response) -> ApiError:
    try:
        problem = answer.json()
    except ValueError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    retry_after = answer.headers.get("Retry-After")
    return ApiError(answer.status_code, problem.get("title", answer.reason or ""),
                    problem.get("detail", answer.text[:500]), problem.get("errors"),
                    retry_after_s(retry_after) if retry_after else None)


__all__ = ["ApiError", "Batch", "Client", "Job", "WebhookVerificationError", "build_request", "verify_webhook"]
