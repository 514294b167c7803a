"""``/v1/jobs``: submit, read (with long-poll) and fetch a job's files."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass

from flask import Blueprint, Response, request, url_for

from domain import trace
from domain.cancel_after import parse_cancel_after
from domain.documents import job_document, job_result
from domain.errors import Conflict, InputError, NotFound, ServiceUnavailable, TooManyRequests, ValidationFailed
from domain.image_records import ImageRecord
from domain.images import DecodedImage, decode_image
from domain.keys import job_prefix
from domain.records import JobRecord, JobState, rfc3339
from domain.result_keys import OVERLAY_FILE, file_key
from domain.schemas import JobRequest, check_request, parse_request
from domain.videos import sniff_video
from domain.webhook_urls import check_webhook_url
from models.catalog import ModelCatalog
from runtime import logs
from stores import job_metrics
from stores.fleet import live_workers
from stores.lanes import send_job
from stores.result_cache import CachedResult, ResultCache
from webapp.auth import choose_lane, current_tenant
from webapp.idempotency import claim_submission
from webapp.images import image_store, stored_image
from webapp.limits import client_id
from webapp.services import Services, services
from webapp.slots import video_upload_slot
from webapp.submission import read_submission
from webapp.video_jobs import new_video_job
from webapp.waits import wait_slot

bp = Blueprint("jobs", __name__)

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MASK_FILE = re.compile(r"masks/[0-9]{1,6}\.png")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}


@bp.post("/v1/jobs")
def submit_job():
    s = services()
    cancel_after_header()  # a bad Cancel-After is a 4xx before the upload is read
    with ExitStack() as held:  # a clip holds one of the process's video slots until its answer
        # An image or a clip (known by its first bytes): no more than its own kind's bound is read into memory.
        data, body = read_submission(
            request,
            s.settings.max_image_bytes,
            max_video_bytes=s.settings.max_video_bytes,
            on_video=lambda: held.enter_context(video_upload_slot(s.settings)),
        )
        return _submit(s, data, body)


def _submit(s: Services, data: bytes | None, body: object):
    # No bytes: the body names an image stored with POST /v1/images (a 422 when it has none such).
    stored = stored_image(s, body) if data is None else None  # type: ignore[arg-type]  # a JSON object here
    job = new_job(s, data, body, stored=stored)
    # Idempotency-Key: 422 on another body (a stored image counts by its id, as an upload by its bytes)
    claim = claim_submission(
        job.record.id, data if data is not None else f"image_id:{job.record.image_sha256}".encode(), body
    )
    if claim.replayed:
        return _replayed(claim.job_id)
    # The caller's W3C trace context (a bad one is ignored), else a new trace: the job carries it to its end.
    job.record.traceparent = trace.parse(request.headers.get("traceparent")) or trace.new()
    record = job.record
    with logs.job_context(
        job_id=record.id, tenant=record.tenant, model=record.model, lane=record.lane, traceparent=record.traceparent
    ):
        return _answer(s, accept(s, job))


@dataclass
class NewJob:
    """A checked submission not stored yet: its record, and what storing it needs."""

    record: JobRecord
    data: bytes | None  # None for a stored image (POST /v1/images)
    image: DecodedImage | None  # None for a result-cache hit or a stored image (their bytes were checked before)
    cached: CachedResult | None
    cache: ResultCache
    catalog: ModelCatalog
    stored: ImageRecord | None = None  # the stored image the job names instead of an upload
    video_type: str | None = None  # a video's media type (webapp/video_jobs.py); None for an image

    @property
    def media_type(self) -> str:
        """What the stored input is: the video's type, else the decoded image's."""
        if self.video_type is not None:
            return self.video_type
        assert self.image is not None  # decoded: not a cache hit, not a stored image
        return self.image.media_type


def new_job(
    s: Services, data: bytes | None, body: object, batch: str | None = None, stored: ImageRecord | None = None
) -> NewJob:
    """Check one image and its request (every 4xx a submission can earn) and make the job's record.

    ``body`` is the request JSON, parsed here once, or a request parsed already (a batch's image's); the
    record keeps it typed, and so does every reader after it (``JobRecord.request``). ``stored``: the image
    is one stored with ``POST /v1/images`` (``data`` None), checked and measured then, never decoded again.
    """
    settings = s.settings
    job_request = body if isinstance(body, JobRequest) else parse_request(body)
    if data is not None and sniff_video(data) is not None:  # a clip, by its bytes: checked end to end there
        record, video_type, catalog = new_video_job(s, data, job_request, batch, cancel_after_header())
        cache = ResultCache(s.jobs, settings, catalog, s.celery)
        return NewJob(record, data, None, None, cache, catalog, video_type=video_type)
    if job_request.video is not None:
        raise ValidationFailed(
            "video options are for a video upload (MP4, MOV, WebM or Matroska); this upload is not one",
            errors=[{"field": "video", "message": "the upload is not a video"}],
        )
    if job_request.webhook is not None:
        check_webhook_url(job_request.webhook.url, settings.webhook_allowed_networks)  # 422 for private targets
    catalog = s.catalog.current()  # one reading of the manifest for the whole submission, even if it changes now
    # A job that names no model goes by its prompts (the manifest's routes); the record keeps the name.
    spec = catalog.spec(job_request.model or catalog.route(job_request.prompts.kinds))
    image_sha256 = stored.id if stored is not None else hashlib.sha256(data or b"").hexdigest()
    cache = ResultCache(s.jobs, settings, catalog, s.celery)
    cache_key = cache.key_for(
        job_request, image_sha256=image_sha256, model=spec.name, version=spec.version, tenant=current_tenant()
    )
    # Bytes the cache has a result for were decoded and accepted before: their size is known, and decoding
    # them again would be most of the cost of a hit.
    cached = cache.find(cache_key)
    image = (
        None
        if cached or data is None
        else decode_image(data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
    )
    if cached:
        width, height = cached.width, cached.height
    elif stored is not None:
        width, height = stored.width, stored.height
    else:
        assert image is not None  # decoded just above
        width, height = image.width, image.height
    check_request(
        job_request.model_copy(update={"model": spec.name}),
        width=width,
        height=height,
        prompt_kinds=catalog.prompt_kinds(spec.name),
        max_prompts=settings.max_prompts,
        max_text_chars=settings.max_text_prompt_chars,
        requires_prompt=catalog.requires_prompt(spec.name),
        max_points_per_side=settings.max_points_per_side,
    )
    # Text the model cannot know (objects by name: a phrase that is no COCO class) is a 422 here, never a failed job.
    catalog.check_text(spec.name, job_request.prompts.text)
    # A model whose files (or a step's) are not there and that has no fallback: no worker can run it, say so now.
    reason = catalog.unavailable(spec.name)
    if reason is not None:
        routed = "" if job_request.model else f" (a job naming no model with these prompts goes to {spec.name!r})"
        raise ServiceUnavailable(
            f"model {spec.name!r} cannot run in this deployment: {reason}{routed}",
            retry_after=60,
            errors=[{"field": "model", "message": f"model {spec.name!r} is unavailable: {reason}"}],
        )
    lane = choose_lane(job_request.lane)  # 403 above the key's ceiling
    job_id = uuid.uuid4().hex
    if cached:
        input_key = cached.input_key
    elif stored is not None:
        input_key = stored.input_key  # the job reads the stored image: nothing is written again
    else:
        assert image is not None
        input_key = f"{job_prefix(current_tenant(), job_id)}input.{EXTENSIONS[image.format]}"
    record = JobRecord.submitted(
        job_id,
        job_request,
        tenant=current_tenant(),
        lane=lane,
        model=spec.name,
        model_version=spec.version,
        cancel_after=cancel_after_header(),
        input_key=input_key,
        image_sha256=image_sha256,
        width=width,
        height=height,
        cache_key=cache_key,
        batch=batch,
    )
    return NewJob(record, data, image, cached, cache, catalog, stored)


def accept(s: Services, job: NewJob, check_room: bool = True) -> JobRecord:
    """Store the new job (or answer it from the cache) and send it to its lane; return its record."""
    settings, record, cache = s.settings, job.record, job.cache
    if job.stored is not None:  # used now: the image is kept retention_s from this job, as a job's own input is
        image_store(s).touch(job.stored.tenant, job.stored.id)
    if job.cached is not None:  # a job of its own, already succeeded with the identical job's result; nothing queued
        # (counted as a cache hit in the same transaction as its record: stores/jobs.py)
        return cache.serve(record, job.cached)
    if check_room:
        s.lanes.check_room(record.lane)
    # Input first, record second, message last: a worker that gets the message finds both.
    if job.stored is None:
        assert job.data is not None  # an upload: not a cache hit, not a stored image
        s.storage.put(record.input_key, job.data, job.media_type)
    s.jobs.create(record)
    log.info("job %s: accepted for model %s on the %s lane", record.id, record.model, record.lane)
    follows = cache.join(record)  # an identical job in flight: this one gets its result, and is not sent
    if record.cache_key is not None:
        s.jobs.metrics.count(job_metrics.RESULT_CACHE, "coalesced" if follows else "miss")
    if follows is None:
        send_job(
            s.celery,
            record.id,
            record.lane,
            job.catalog.time_limits(record.model, settings, record.media),
            traceparent=record.traceparent,
        )
    s.jobs.sent(record.id)  # had this process died before here, recovery would send it (workers/recovery.py)
    return record


def _answer(s: Services, record: JobRecord) -> Response:
    """The submit's answer: the job (waiting for its end first if the client prefers)."""
    settings, job_id = s.settings, record.id
    wait = 0 if record.status.ended else preferred_wait(request.headers.get("Prefer"), settings.max_wait_s)
    if wait:  # one round trip for an interactive client: the ended job if it ends in time
        with wait_slot(s.redis, client_id(), wait, settings.max_waits_per_key) as waiting:
            if waiting:  # a preference, not a demand: over the key's waits, the answer comes at once
                record = s.jobs.wait_until_ended(job_id, wait) or record
            else:
                wait = 0
    response = _json(_document(record), 200 if record.status.ended else 202)
    response.headers["Location"] = url_for("jobs.get_job", job_id=job_id)
    if wait:
        response.headers["Preference-Applied"] = f"wait={wait:g}"
        response.headers["Vary"] = "Prefer"
    return response


def preferred_wait(header: str | None, limit: int) -> float:
    """Seconds from ``Prefer: wait=N`` (RFC 7240), capped at ``limit``; 0 without one.

    A preference is a hint: one that cannot be read is ignored, as the RFC asks, never an error.
    """
    for preference in (header or "").split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                return 0
            return min(max(seconds, 0), limit) if seconds == seconds else 0  # NaN is no number of seconds
    return 0


@bp.get("/v1/jobs/<job_id>")
def get_job(job_id: str):
    s = services()
    wait = _wait_seconds(s.settings.max_wait_s)
    record = load_job(job_id)
    if wait and not record.status.ended:
        with wait_slot(s.redis, client_id(), wait, s.settings.max_waits_per_key) as waiting:
            if not waiting:
                raise TooManyRequests(
                    f"this key already holds {s.settings.max_waits_per_key} waiting requests "
                    "(MASKQ_MAX_WAITS_PER_KEY); poll without wait, or when one of them ends",
                    retry_after=1,
                )
            record = s.jobs.wait_until_ended(job_id, wait) or record
    return _json(_document(record), 200)


@bp.delete("/v1/jobs/<job_id>")
def cancel_job(job_id: str):
    """A queued job never runs; a running job's result is discarded; an ended job is a 409."""
    s = services()
    record = load_job(job_id)
    moved, before = s.jobs.cancel(record.id)
    if not moved:
        raise Conflict(f"job {job_id} has already ended ({before}); there is nothing to cancel")
    if before == JobState.QUEUED:
        s.celery.control.revoke(job_id)  # a hint to workers; the record is what stops it
    # Identical jobs that waited on this one are not canceled with it: one of them runs in its place.
    ResultCache(s.jobs, s.settings, s.catalog, s.celery).settle(job_id)
    return _json(_document(load_job(job_id)), 200)


@bp.get("/v1/jobs/<job_id>/files/<path:name>")
def get_job_file(job_id: str, name: str):
    record = load_job(job_id)
    # Only the names the service writes: a mask's PNG, a video's overlay, or the input's own file name.
    if not (MASK_FILE.fullmatch(name) or name == OVERLAY_FILE or name == record.input_key.rpartition("/")[2]):
        raise NotFound("no such file")
    key = file_key(record, name)  # a cached or coalesced job's masks are those of the job that ran
    try:
        data = services().storage.get(key)
    except KeyError:
        raise NotFound("no such file") from None
    mimetype = {".png": "image/png", ".mp4": "video/mp4"}.get(name[name.rfind(".") :], "application/octet-stream")
    return Response(data, mimetype=mimetype)


def load_job(job_id: str) -> JobRecord:
    """The tenant's job ``job_id``, or a 404 (for every route that takes a job id)."""
    s = services()
    record = s.jobs.get(job_id) if JOB_ID.match(job_id) else None
    # Another tenant's job is exactly as absent as one that never existed.
    if record is None or record.tenant != current_tenant():
        raise NotFound(f"no job {job_id}")
    # A deadline can pass while no worker looks at the job: end it on read too.
    if record.status == JobState.QUEUED and record.deadline_at and time.time() > record.deadline_at:
        s.jobs.expire(job_id)
        record = s.jobs.get(job_id) or record
    # And so can a Cancel-After (queued or running), between two ticks of the workers' upkeep.
    if not record.status.ended and record.cancel_at is not None and time.time() >= record.cancel_at:
        if s.jobs.cancel_overdue(job_id):
            ResultCache(s.jobs, s.settings, s.catalog, s.celery).settle(job_id)  # as DELETE does
        record = s.jobs.get(job_id) or record
    return record


def cancel_after_header() -> float | None:
    """Seconds from the request's ``Cancel-After`` header (domain/cancel_after.py); None without one.

    For ``POST /v1/jobs`` and ``POST /v1/batches`` (each job of a batch gets it): a bad value is a 4xx
    naming the header.
    """
    return parse_cancel_after(request.headers.get("Cancel-After"))


def _replayed(job_id: str) -> Response:
    """The answer to a repeated submit: the job the first one made, as it stands now."""
    record = load_job(job_id)
    response = _json(_document(record), 200 if record.status.ended else 202)
    response.headers["Location"] = url_for("jobs.get_job", job_id=job_id)
    response.headers["Idempotent-Replayed"] = "true"
    return response


def _document(record: JobRecord) -> dict:
    doc = job_document(record, _result(record))
    if record.status == JobState.QUEUED:
        s = services()
        # A coalesced job waits in no lane of its own: it starts when the job it waits on does.
        waits_on = s.jobs.get(record.coalesced_with) if record.coalesced_with else None
        position = s.lanes.position(waits_on or record)
        if position is not None:
            doc["queue_position"] = position
            workers = max(len(live_workers(s.redis)), 1)
            doc["estimated_start_at"] = rfc3339(s.lanes.estimated_start(position, workers))
    return doc


def job_view(record: JobRecord) -> dict:
    """The job as this API shows it: ``GET /v1/jobs/{id}``'s body (the event streams send it too)."""
    return _document(record)


def _result(record: JobRecord) -> dict | None:
    s = services()
    return job_result(record, s.storage, s.settings.public_url or request.host_url)


def _wait_seconds(limit: int) -> float:
    raw = request.args.get("wait")
    if raw is None:
        return 0
    try:
        wait = float(raw)
    except ValueError:
        wait = -1
    if not 0 <= wait <= limit:
        raise InputError(
            f"wait must be a number of seconds from 0 to {limit}",
            errors=[{"field": "wait", "message": f"must be 0..{limit}"}],
        )
    return wait


def _json(body: dict, status: int) -> Response:
    response = Response(json.dumps(body, ensure_ascii=False), status=status, mimetype="application/json")
    return response
