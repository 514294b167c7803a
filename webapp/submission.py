"""Reading a job submission: the image bytes and the request JSON, multipart or inline."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable

from flask import Request

from domain.errors import InputError, PayloadTooLarge, UnsupportedMediaType
from domain.videos import sniff_video

# Enough of an upload's first bytes to tell a video container (domain/videos.py's sniff_video).
SNIFF_BYTES = 256
# The request JSON sent as a file part: as much as Flask allows a form field (MAX_FORM_MEMORY_SIZE).
MAX_REQUEST_PART_BYTES = 8 * 1024 * 1024


def max_upload_bytes(settings) -> int:
    """The most bytes one uploaded file may have: an image's bound or a video's, whichever is larger.

    What the file is shows only in its bytes; each kind then checks its own bound (domain/images.py,
    domain/videos.py), so a 30 MB JPEG is still a 413 where images may have 20 MB.
    """
    return max(settings.max_image_bytes, settings.max_video_bytes)


def read_submission(
    request: Request,
    max_image_bytes: int,
    max_video_bytes: int | None = None,
    on_video: Callable[[], None] | None = None,
) -> tuple[bytes | None, object]:
    """``(image bytes, request JSON)`` from ``multipart/form-data`` or ``application/json``.

    Flask's ``MAX_CONTENT_LENGTH`` already stops a body that is too large
    while it is read (werkzeug keeps a large file part on disk); this enforces
    the upload's own limit: ``max_video_bytes`` (where clips are taken) for a
    file whose first bytes say video, else ``max_image_bytes``, and no more than
    that is ever read into memory. ``on_video`` is called once the first bytes say
    video, before the rest is read (the caller takes its slot: webapp/slots.py). A JSON body that names a stored image
    (``"image_id"``, from ``POST /v1/images``) instead of sending one gives no
    bytes (None), and keeps ``image_id`` in the body.
    """
    if request.mimetype == "multipart/form-data":
        uploads = request.files.getlist("image")
        if not uploads:
            what = "is a text field, not a file part" if "image" in request.form else "is missing"
            raise InputError(
                f"the multipart body's 'image' part {what} (curl: -F image=@photo.jpg)",
                errors=[{"field": "image", "message": "missing"}],
            )
        if len(uploads) > 1:  # which one was meant? (a batch takes many: POST /v1/batches)
            raise InputError(
                f"the multipart body has {len(uploads)} 'image' parts; a job takes one (many: POST /v1/batches)",
                errors=[{"field": "image", "message": "more than one"}],
            )
        upload = uploads[0]
        head = upload.stream.read(SNIFF_BYTES)
        if on_video is not None and max_video_bytes is not None and sniff_video(head) is not None:
            on_video()
        limit = _limit(head, max_image_bytes, max_video_bytes)
        data = head + upload.stream.read(max(0, limit + 1 - len(head)))
        body = json_part(request, "request")
        body = {} if body is None else body
    elif request.mimetype == "application/json":
        body = parse_json(request.get_data(cache=False, as_text=False), "body")
        if not isinstance(body, dict):
            raise InputError("the JSON body must be an object")
        image = body.pop("image", None)
        if "image_id" in body:
            if image is not None:
                raise InputError(
                    'send "image" or "image_id", not both',
                    errors=[{"field": "image_id", "message": "with image"}],
                )
            return None, body
        if not isinstance(image, dict) or not isinstance(image.get("base64"), str):
            raise InputError(
                'the JSON body needs "image": {"base64": "..."}, or "image_id" (POST /v1/images)',
                errors=[{"field": "image", "message": "missing"}],
            )
        if len(image["base64"]) > (max(max_image_bytes, max_video_bytes or 0) + 2) * 4 // 3 + 4:
            raise PayloadTooLarge(f"the upload is larger than {max(max_image_bytes, max_video_bytes or 0)} bytes")
        try:
            data = base64.b64decode(image["base64"], validate=True)
        except (binascii.Error, ValueError):
            raise InputError(
                "image.base64 is not valid base64", errors=[{"field": "image.base64", "message": "not base64"}]
            ) from None
        if on_video is not None and max_video_bytes is not None and sniff_video(data[:SNIFF_BYTES]) is not None:
            on_video()  # (the body is in memory already: Flask's limit bounds it; the slot bounds the decode)
    else:
        raise UnsupportedMediaType("send multipart/form-data (parts 'image' and 'request') or application/json")
    limit = _limit(data[:SNIFF_BYTES], max_image_bytes, max_video_bytes)
    if len(data) > limit:
        what = "image" if limit == max_image_bytes else "video"
        raise PayloadTooLarge(f"the {what} is larger than {limit} bytes")
    return data, body


def _limit(head: bytes, max_image_bytes: int, max_video_bytes: int | None) -> int:
    """The bound of an upload that starts with ``head``: a video's where clips are taken and it is one."""
    return max_video_bytes if max_video_bytes is not None and sniff_video(head) is not None else max_image_bytes


def json_part(request: Request, name: str) -> object:
    """The JSON of multipart part ``name``, a form field or a file part; None when absent or blank."""
    if len(request.form.getlist(name)) + len(request.files.getlist(name)) > 1:
        raise InputError(
            f"the multipart body has more than one {name!r} part", errors=[{"field": name, "message": "more than one"}]
        )
    raw: str | bytes | None = request.form.get(name)
    if raw is None and name in request.files:  # `curl -F request=@req.json` sends it as a file
        raw = request.files[name].stream.read(MAX_REQUEST_PART_BYTES + 1)
        if len(raw) > MAX_REQUEST_PART_BYTES:
            raise PayloadTooLarge(f"the {name} part is larger than {MAX_REQUEST_PART_BYTES} bytes")
    return None if raw is None or not raw.strip() else parse_json(raw, name)


def parse_json(raw: str | bytes, what: str) -> object:
    try:
        return json.loads(raw)
    except RecursionError:  # Python's decoder recurses per level: a few thousand "[" exhaust it
        raise InputError(
            f"the {what} is nested too deeply to be a job request",
            errors=[{"field": what, "message": "nested too deeply"}],
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(
            f"the {what} is not valid JSON: {exc}", errors=[{"field": what, "message": "invalid JSON"}]
        ) from None
