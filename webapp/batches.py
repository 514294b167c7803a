"""``/v1/batches``: many images in one request, one job each on the batch lane, followed as one batch.

``POST`` takes ``multipart/form-data``: image parts named ``images`` (as
many as allowed) and/or one ``archive`` part (zip or tar), a ``request``
part (one job request for every image, on the ``batch`` lane unless it
says otherwise; its ``webhook`` gets ``batch.completed``) and an optional
``prompts`` part (a JSON object: file name → that image's prompts). Every
image is checked as ``POST /v1/jobs`` checks it; one that fails is listed
under ``rejected`` with its problem, and the rest go on. The batch itself
lives in Redis (stores/batches.py), so it outlives any process.

The upload is read twice, never held whole: a first reading checks every
bound and keeps each image's name and digest (for the Idempotency-Key's
fingerprint and the prompts' names); the second makes one job per image, with
one image in memory at a time. A web process takes at most
``MASKQ_MAX_CONCURRENT_BATCH_UPLOADS`` uploads at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from flask import Blueprint, Response, request, url_for

from domain import trace
from domain.archives import Member, iter_archive
from domain.batches import BatchRecord, document
from domain.coco import Item, coco_document
from domain.documents import stored_job_document
from domain.errors import (
    Conflict,
    MaskqError,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
    ValidationFailed,
)
from domain.records import JobState
from domain.schemas import BatchRequest, PromptSet, parse_model
from domain.webhook_urls import check_webhook_url
from stores.batches import BatchStore
from stores.result_cache import ResultCache
from stores.webhooks import notify_batches
from webapp.auth import choose_lane, current_tenant
from webapp.idempotency import claim_submission
from webapp.jobs import accept, cancel_after_header, new_job
from webapp.services import services
from webapp.slots import batch_upload_slot
from webapp.submission import json_part, max_upload_bytes

bp = Blueprint("batches", __name__)

log = logging.getLogger(__name__)

BATCH_ID_LENGTH = 32
FORM_SLACK_BYTES = 1024 * 1024


def batches() -> BatchStore:
    s = services()
    return BatchStore(s.redis, s.jobs)


@bp.post("/v1/batches")
def submit_batch():
    with batch_upload_slot(services().settings):  # before the body is read
        return _submit_batch()


def _submit_batch():
    s = services()
    settings = s.settings
    # This route alone takes a whole folder; the app's limit is one image's. (A megabyte more for the
    # request and prompts parts and the multipart framing.)
    request.max_content_length = settings.max_batch_bytes + FORM_SLACK_BYTES
    # Every file part to disk as it arrives: werkzeug keeps up to 500 kB of each in memory, and a batch may
    # have hundreds of parts. The images are then read one at a time (below).
    request._get_file_stream = _file_part_stream  # type: ignore[method-assign]  # werkzeug's hook for file parts
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaType(
            "send multipart/form-data: parts 'images' (repeatable) or 'archive', 'request', and optionally 'prompts'"
        )
    cancel_after_header()  # a bad Cancel-After is a 4xx before the upload is read; each job reads it (new_job)
    body = json_part(request, "request")
    body = {} if body is None else body
    batch_request = parse_model(BatchRequest, body, "request")
    if batch_request.webhook is not None:
        check_webhook_url(batch_request.webhook.url, settings.webhook_allowed_networks)  # 422 for private targets
    prompts = json_part(request, "prompts")
    per_image = _per_image_prompts({} if prompts is None else prompts, settings.max_batch_images)
    choose_lane(batch_request.lane)  # 403 above the key's ceiling, before anything is read
    images = _survey(settings, per_image)
    if not images:
        raise ValidationFailed(
            "the batch has no images: send parts named 'images', or an 'archive'",
            errors=[{"field": "images", "message": "missing"}],
        )
    depth, limit = s.lanes.depth(batch_request.lane), settings.lane_max_depth[batch_request.lane]
    if depth + len(images) > limit:
        raise ServiceUnavailable(
            f"the {batch_request.lane} lane has room for {max(limit - depth, 0)} more jobs, "
            f"not {len(images)}; try again later",
            retry_after=30,
        )
    store = batches()
    batch = BatchRecord(
        id=store.new_id(),
        tenant=current_tenant(),
        created_at=time.time(),
        lane=batch_request.lane,
        model=batch_request.model,
        webhook=batch_request.webhook.model_dump(mode="json") if batch_request.webhook else None,
    )
    fingerprint = hashlib.sha256(b"".join(image.sha256 for image in images)).digest()
    claim = claim_submission(
        batch.id,
        fingerprint,
        {"request": body, "prompts": per_image_raw(per_image), "names": [image.name for image in images]},
    )
    if claim.replayed:
        return _answer(load_batch(claim.job_id), 200, replayed=True)
    store.create(batch)
    traceparent = trace.parse(request.headers.get("traceparent")) or trace.new()
    rejected = []
    for member in _members(settings):  # the upload read again, one image in memory at a time
        # Signs of life: the batch is not abandoned, and a retry with the same key is not a second batch.
        store.touch(batch.id)
        claim.keep_alive()
        rejection = _add(s, store, batch, member, batch_request, per_image, traceparent)
        if rejection is not None:
            rejected.append(rejection)
    if rejected:
        store.reject(batch.id, rejected)
    if len(rejected) == len(images):
        store.discard(batch.id)  # no batch, no batch.completed: the answer is the 422
        raise ValidationFailed(
            f"none of the {len(images)} images could be accepted",
            errors=[{"field": r["file_name"], "message": r["detail"]} for r in rejected],
        )
    if store.seal(batch.id):  # every job had ended already (result-cache hits): the batch is complete now
        notify_batches(store, _base_url(), s.celery)
    log.info(
        "batch %s: %d jobs on the %s lane, %d rejected",
        batch.id,
        len(images) - len(rejected),
        batch.lane,
        len(rejected),
    )
    return _answer(load_batch(batch.id), 202)


def _file_part_stream(total_content_length, content_type, filename=None, content_length=None):
    return tempfile.TemporaryFile("rb+")


@dataclass(frozen=True)
class Seen:
    """One image of the upload as the first reading saw it: its name and its bytes' digest."""

    name: str
    sha256: bytes


def _add(
    s,
    store: BatchStore,
    batch: BatchRecord,
    member: Member,
    batch_request: BatchRequest,
    per_image: dict[str, PromptSet],
    traceparent: str,
) -> dict | None:
    """The image's job, added to the batch; or the image's problem, when it is refused."""
    if member.too_large:
        return {
            "file_name": member.name,
            "status": 413,
            "detail": f"the file is larger than {max_upload_bytes(s.settings)} bytes",
        }
    job = None
    try:
        job = new_job(s, member.data, batch_request.job_request(per_image.get(member.name)), batch=batch.id)
        job.record.traceparent = traceparent
        store.will_add(batch.id, job.record.id)
        record = accept(s, job, check_room=False)  # the room for every job was checked up front
    except MaskqError as exc:
        if job is not None:
            store.not_added(batch.id, job.record.id)
        return {
            "file_name": member.name,
            "status": exc.status,
            "detail": exc.detail,
            **({"errors": exc.errors} if exc.errors else {}),
        }
    store.added(batch.id, record.id, member.name, record.status.ended)
    return None


def _members(settings) -> Iterator[Member]:
    """The uploaded images (parts ``images``, then the ``archive``'s members), one at a time, bounded.

    Each call reads the upload again from its start (its parts are files on disk).
    """
    parts = request.files.getlist("images")
    if len(parts) > settings.max_batch_images:
        raise PayloadTooLarge(f"a batch holds at most {settings.max_batch_images} images (MASKQ_MAX_BATCH_IMAGES)")
    for number, part in enumerate(parts, 1):
        size = part.stream.seek(0, os.SEEK_END)  # (a read of the limit would allocate the limit)
        part.stream.seek(0)
        name = part.filename or f"image-{number}"
        too_large = size > max_upload_bytes(settings)  # an image or a video (webapp/submission.py)
        yield Member(name, too_large=True) if too_large else Member(name, part.stream.read(size))
    archive = request.files.get("archive")
    if archive is not None:
        yield from iter_archive(
            archive.stream,
            max_images=settings.max_batch_images - len(parts),
            max_image_bytes=max_upload_bytes(settings),
            max_total_bytes=settings.max_batch_bytes,
        )


def _survey(settings, per_image: dict) -> list[Seen]:
    """A first reading of the upload: every bound checked, each image's name and digest kept, no bytes."""
    empty = hashlib.sha256(b"").digest()  # an image too large to read counts as no bytes
    images = [Seen(m.name, hashlib.sha256(m.data).digest() if not m.too_large else empty) for m in _members(settings)]
    names = [image.name for image in images]
    unknown = sorted(set(per_image) - set(names))
    if unknown:
        raise ValidationFailed(
            f"prompts name files that are not in the batch: {', '.join(unknown[:5])}",
            errors=[{"field": f"prompts[{n}]", "message": "no such image"} for n in unknown[:20]],
        )
    if len(set(names)) != len(names):  # per-image prompts and the COCO file go by name
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValidationFailed(
            f"file names must be unique in a batch: {', '.join(twice[:5])}",
            errors=[{"field": "images", "message": f"{n!r} appears twice"} for n in twice[:20]],
        )
    return images


def _per_image_prompts(raw: object, most: int) -> dict[str, PromptSet]:
    if not isinstance(raw, dict):
        raise ValidationFailed(
            "the prompts part must be a JSON object: file name -> prompts",
            errors=[{"field": "prompts", "message": "must be an object"}],
        )
    if len(raw) > most:  # before validating any: each name costs a model validation
        raise ValidationFailed(
            f"the prompts part names {len(raw)} images; a batch holds at most {most}",
            errors=[{"field": "prompts", "message": f"more than {most} entries"}],
        )
    return {name: parse_model(PromptSet, prompts, f"prompts[{name}]") for name, prompts in raw.items()}


def per_image_raw(per_image: dict[str, PromptSet]) -> dict:
    return {name: prompts.model_dump(mode="json") for name, prompts in sorted(per_image.items())}


@bp.get("/v1/batches/<batch_id>")
def get_batch(batch_id: str):
    return _answer(load_batch(batch_id), 200)


@bp.get("/v1/batches/<batch_id>/coco")
def get_batch_coco(batch_id: str):
    """The batch's results as one COCO file: succeeded jobs as images and annotations, the rest as failures."""
    s = services()
    batch = load_batch(batch_id)
    store = batches()
    items = []
    for job_id, name in store.job_entries(batch.id):
        record = s.jobs.get(job_id)
        if record is None:
            items.append(Item(name, error="the job's record has expired"))
        elif not record.status.ended:
            items.append(Item(name, error=f"{record.status}: not ended yet"))
        else:
            items.append(Item(name, job=stored_job_document(record, s.storage, _base_url())))
    coco = coco_document(items, description=f"maskq batch {batch.id}")
    coco["failures"] += [
        {"file_name": r["file_name"], "error": f"{r['status']}: {r['detail']}"} for r in batch.rejected
    ]
    return Response(json.dumps(coco, ensure_ascii=False), mimetype="application/json")


@bp.delete("/v1/batches/<batch_id>")
def cancel_batch(batch_id: str):
    """Cancel every queued job of the batch (running ones finish); a batch already complete is a 409."""
    s = services()
    batch = load_batch(batch_id)
    if batch.completed_at is not None:
        raise Conflict(f"batch {batch_id} has already ended ({batch.status}); there is nothing to cancel")
    store = batches()
    store.mark_canceled(batch.id)
    cache = ResultCache(s.jobs, s.settings, s.catalog, s.celery)
    canceled = []
    for job_id, _ in store.job_entries(batch.id):
        moved, _before = s.jobs.move(job_id, JobState.CANCELED, {JobState.QUEUED}, finished_at=time.time())
        if moved:
            canceled.append(job_id)
            cache.settle(job_id)
    if canceled:
        s.celery.control.revoke(canceled)  # one broadcast, a hint to workers; the records are what stop them
    notify_batches(store, _base_url(), s.celery)  # the last cancel may have completed it
    return _answer(load_batch(batch.id), 200)


def load_batch(batch_id: str) -> BatchRecord:
    """The tenant's batch ``batch_id``, or a 404; a batch whose upload was cut off long ago is sealed on read."""
    s, store = services(), batches()
    ok = len(batch_id) == BATCH_ID_LENGTH and all(c in "0123456789abcdef" for c in batch_id)
    batch = store.get(batch_id) if ok else None
    if batch is None or batch.tenant != current_tenant():
        raise NotFound(f"no batch {batch_id}")
    batch = store.seal_if_abandoned(batch, s.settings.batch_receive_timeout_s)
    if batch.completed_at is not None:  # its event is due, unless queued already: queue it if no one has
        notify_batches(store, _base_url(), s.celery)
    return batch


def _answer(batch: BatchRecord, status: int, replayed: bool = False) -> Response:
    store = batches()
    entries = store.job_entries(batch.id)
    doc = document(batch, entries, store.statuses([job_id for job_id, _ in entries]), _base_url())
    response = Response(json.dumps(doc, ensure_ascii=False), status=status, mimetype="application/json")
    response.headers["Location"] = url_for("batches.get_batch", batch_id=batch.id)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _base_url() -> str:
    return services().settings.public_url or request.host_url
