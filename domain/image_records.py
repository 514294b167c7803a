"""An image stored ahead of its jobs (``POST /v1/images``): its record, and the document clients see.

The image's id is its content's SHA-256 (hex), within its tenant: uploading the
same bytes again names the same image, and the id is the key the encoder cache
keeps the image's embedding under (``models/encoder_cache.py``), so a job that
names the image finds the embedding the upload's encode-only task left there.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from enum import StrEnum

from domain.records import rfc3339

IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}


class Encoding(StrEnum):
    """Where the image's embedding stands (the document's ``encoding``)."""

    NONE = "none"  # the model has no image encoder to run ahead (nothing is queued)
    QUEUED = "queued"  # the encode-only task is queued or running
    READY = "ready"  # in the shared encoder cache: a job on the image runs only the decoder
    FAILED = "failed"  # the encoder failed (``error`` says why); a job on the image encodes it itself
    EVICTED = "evicted"  # shown, never stored: it was ready, and the shared cache has let it go since


@dataclass
class ImageRecord:
    """One tenant's stored image and its encoding; kept in Redis by ``stores/images.py``.

    ``encoding_key`` is the shared encoder cache's key the worker wrote (None when the worker
    keeps encodings only in its own memory), so a reader can tell whether it is still there.
    """

    tenant: str
    id: str
    input_key: str
    media_type: str
    width: int
    height: int
    size: int
    created_at: float
    used_at: float
    model: str | None = None
    encoding: Encoding = Encoding.NONE
    encoding_key: str | None = None
    encoded_at: float | None = None
    encode_s: float | None = None
    error: str | None = None

    def to_hash(self) -> dict[str, str]:
        """The record as a Redis hash: absent values are left out."""
        return {name: str(value) for name, value in asdict(self).items() if value is not None}

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> ImageRecord:
        values = {k.decode(): v.decode() for k, v in raw.items()}
        kinds = {f.name: f.type for f in fields(cls)}
        parsed: dict[str, object] = {}
        for name, value in values.items():
            kind = str(kinds.get(name, ""))
            if not kind:
                continue  # a field a later version added: ignored by this one
            if kind.startswith("int"):
                parsed[name] = int(value)
            elif kind.startswith("float"):
                parsed[name] = float(value)
            elif kind == "Encoding":
                parsed[name] = Encoding(value)
            else:
                parsed[name] = value
        return cls(**parsed)  # type: ignore[arg-type]  # each field converted by its declared type above


def image_document(record: ImageRecord, retention_s: float, still_cached: bool = True) -> dict[str, object]:
    """The image as ``POST /v1/images`` and ``GET /v1/images/{id}`` show it.

    ``still_cached``: whether the shared encoder cache still holds the embedding (read by the caller);
    a ready encoding that it no longer holds shows as ``evicted``.
    """
    encoding = record.encoding
    if encoding == Encoding.READY and not still_cached:
        encoding = Encoding.EVICTED
    document: dict[str, object] = {
        "id": record.id,
        "sha256": record.id,
        "width": record.width,
        "height": record.height,
        "bytes": record.size,
        "media_type": record.media_type,
        "model": record.model,
        "encoding": str(encoding),
        "created_at": rfc3339(record.created_at),
        "expires_at": rfc3339(record.used_at + retention_s),
    }
    if record.encoded_at is not None:
        document["encoded_at"] = rfc3339(record.encoded_at)
    if record.encode_s is not None:
        document["encode_s"] = record.encode_s
    if record.error:
        document["error"] = record.error
    return document
