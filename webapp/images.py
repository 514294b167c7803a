"""``/v1/images``: an image stored once, its encoder started at once; later jobs name it instead of sending it.

``POST /v1/images`` checks the upload as ``POST /v1/jobs`` does (bytes, pixels,
format), stores it under the tenant by its sha256 (the same bytes again name the
same image), and queues the encode-only task (``tasks/warm_image.py``) for the
model, on the interactive lane (or the key's highest): by the time the user
clicks, the embedding is in the shared encoder cache and the click's job
(``{"image_id": ...}``, ``webapp/jobs.py``) runs only the decoder.
``GET /v1/images/{id}`` says where the encoding stands.
"""

from __future__ import annotations

import hashlib
import json
import time

from flask import Blueprint, Request, Response, request, url_for
from pydantic import Field

from domain.errors import (
    InputError,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
    ValidationFailed,
)
from domain.image_records import EXTENSIONS, IMAGE_ID, Encoding, ImageRecord, image_document
from domain.images import decode_image
from domain.keys import image_prefix
from domain.schemas import Strict, parse_model
from domain.tenants import lane_allowed
from models.catalog import ModelCatalog
from stores.images import ImageStore, send_warm
from webapp.auth import current_key, current_tenant
from webapp.services import Services, services
from webapp.submission import read_submission

bp = Blueprint("images", __name__)

# The lane the encode-only task goes to: a click is waiting on it.
LANE = "interactive"


MODEL_DESCRIPTION = "the SAM-family model whose image encoder runs now (default: the model a points prompt goes to)"


class ImageUpload(Strict):
    """What ``POST /v1/images`` takes besides the image."""

    model: str | None = Field(None, min_length=1, max_length=200, description=MODEL_DESCRIPTION)


@bp.post("/v1/images")
def upload_image():
    s = services()
    settings = s.settings
    data, upload = _read_upload(request, settings.max_image_bytes)
    image = decode_image(data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
    catalog = s.catalog.current()
    model = encoder_model(catalog, upload.model)
    tenant, image_id, now = current_tenant(), hashlib.sha256(data).hexdigest(), time.time()
    images = image_store(s)
    record = images.get(tenant, image_id)
    created = record is None
    if record is None:
        key = f"{image_prefix(tenant, image_id)}image.{EXTENSIONS[image.format]}"
        record = ImageRecord(
            tenant, image_id, key, image.media_type, image.width, image.height, len(data), now, now, model=model
        )
    if created or not s.storage.exists(record.input_key):
        s.storage.put(record.input_key, data, image.media_type)  # file first, record second: a reader finds both
    record.used_at = now  # uploaded again: its retention starts again
    # Encode (again) unless it is queued or ready for this model: a new image, another model, a failed or
    # evicted encoding.
    encode = model is not None and (
        created
        or record.model != model
        or record.encoding in (Encoding.NONE, Encoding.FAILED)
        or (record.encoding == Encoding.READY and not images.still_cached(record))
    )
    if encode:
        record.model, record.encoding = model, Encoding.QUEUED
        record.encoding_key = record.encoded_at = record.encode_s = record.error = None
    images.save(record)
    if encode:
        assert model is not None
        key_ceiling = current_key().max_lane
        lane = LANE if lane_allowed(LANE, key_ceiling) else key_ceiling
        send_warm(s.celery, tenant, image_id, model, lane, catalog.time_limits(model, settings))
    response = _json(image_document(record, settings.retention_s, images.still_cached(record)), 201 if created else 200)
    response.headers["Location"] = url_for("images.get_image", image_id=image_id)
    return response


@bp.get("/v1/images/<image_id>")
def get_image(image_id: str):
    s = services()
    images = image_store(s)
    record = images.get(current_tenant(), image_id) if IMAGE_ID.match(image_id) else None
    if record is None:  # another tenant's image is exactly as absent as one never uploaded
        raise NotFound(f"no image {image_id}")
    return _json(image_document(record, s.settings.retention_s, images.still_cached(record)), 200)


def stored_image(s: Services, body: dict) -> ImageRecord:
    """The tenant's image a job names (``body["image_id"]``, taken out of the body), used now; a 422 otherwise."""
    image_id = body.pop("image_id")
    if not isinstance(image_id, str) or not IMAGE_ID.match(image_id):
        raise ValidationFailed(
            "image_id must be the id POST /v1/images answered (the image's sha256: 64 hex digits)",
            errors=[{"field": "image_id", "message": "not an image id"}],
        )
    record = image_store(s).get(current_tenant(), image_id)
    if record is None:
        raise ValidationFailed(
            f"no image {image_id}: it was never stored for this tenant, or it expired "
            f"({s.settings.retention_s} s after its last use); send it again with POST /v1/images",
            errors=[{"field": "image_id", "message": "no such image"}],
        )
    return record


def image_store(s: Services) -> ImageStore:
    return ImageStore(s.redis, s.settings.retention_s)


def encoder_model(catalog: ModelCatalog, name: str | None) -> str | None:
    """The model whose encoder runs ahead: the one named (a 422 if it has no encoder to run ahead, a 503 if it
    cannot run here), else the model a points prompt goes to if it has one; None: nothing to run ahead."""
    if name is None:
        routed = catalog.route({"points"})
        return routed if catalog.adapter_class(routed).can_warm() and catalog.unavailable(routed) is None else None
    catalog.spec(name)  # a 422 for an unknown model
    if not catalog.adapter_class(name).can_warm():
        raise ValidationFailed(
            f"model {name!r} has no image encoder to run ahead of its prompts; name a SAM-family model, or none",
            errors=[{"field": "model", "message": "no image encoder"}],
        )
    reason = catalog.unavailable(name)
    if reason is not None:
        raise ServiceUnavailable(f"model {name!r} cannot run in this deployment: {reason}", retry_after=60)
    return name


def _read_upload(req: Request, max_image_bytes: int) -> tuple[bytes, ImageUpload]:
    """The image's bytes and the options: multipart (parts ``image`` and ``model``) or JSON (``image.base64``)."""
    fields: object
    if req.mimetype == "multipart/form-data":
        upload = req.files.get("image")
        if upload is None:
            raise InputError(
                "the multipart body has no part named 'image'", errors=[{"field": "image", "message": "missing"}]
            )
        others = sorted(name for name in req.files if name != "image")
        if others:  # a part this route would otherwise ignore: the client meant something by it
            raise InputError(
                f"only 'image' may be a file part; send {', '.join(others)} as a text field",
                errors=[{"field": name, "message": "a file part where a text field is expected"} for name in others],
            )
        data: bytes | None = upload.stream.read(max_image_bytes + 1)
        fields = dict(req.form)  # every text field: an unknown one, or an empty model, is refused by ImageUpload
    elif req.mimetype == "application/json":
        data, fields = read_submission(req, max_image_bytes)
        if data is None:
            raise InputError(
                'POST /v1/images stores an image: send "image"', errors=[{"field": "image", "message": "missing"}]
            )
    else:
        raise UnsupportedMediaType("send multipart/form-data (parts 'image' and 'model') or application/json")
    assert data is not None
    if len(data) > max_image_bytes:
        raise PayloadTooLarge(f"the image is larger than {max_image_bytes} bytes")
    return data, parse_model(ImageUpload, fields, "body")


def _json(body: dict, status: int) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), status=status, mimetype="application/json")
