"""One exception tree for the whole service.

The web front end maps each class to an HTTP status and a problem+json body
(``webapp/errors.py``); the worker maps them to a job's error code and decides
whether to retry.
"""

from __future__ import annotations

from typing import Any


class MaskqError(Exception):
    """Base of every error maskq raises on purpose."""

    status = 500
    code = "internal"
    title = "Internal error"

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class InputError(MaskqError):
    """The client sent something unusable; never retried."""

    status = 400
    code = "input"
    title = "Bad request"


class CorruptImage(InputError):
    title = "Unreadable image"


class UnsupportedMediaType(InputError):
    status = 415
    title = "Unsupported image type"


class CorruptVideo(InputError):
    title = "Unreadable video"


class UnsupportedVideo(UnsupportedMediaType):
    """A container with no video stream, or a codec this build of FFmpeg cannot decode."""

    title = "Unsupported video"


class PayloadTooLarge(InputError):
    status = 413
    title = "Payload too large"


class ValidationFailed(InputError):
    """The request is well formed but names something invalid; ``errors`` say which field."""

    status = 422
    title = "Invalid request"


class Unauthorized(MaskqError):
    """No API key, or one the service does not know: 401."""

    status = 401
    code = "unauthorized"
    title = "Unauthorized"


class Forbidden(MaskqError):
    """A known key that may not do this (revoked, or a lane above its ceiling): 403."""

    status = 403
    code = "forbidden"
    title = "Forbidden"


class NotFound(MaskqError):
    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(MaskqError):
    status = 409
    code = "conflict"
    title = "Conflict"


class ModelError(MaskqError):
    """The model failed on an input it accepted."""

    code = "model"
    title = "Model error"


class StorageUnavailable(MaskqError):
    """The object store could not be reached; retried with backoff (a client is told when to try again)."""

    status = 503
    code = "storage"
    title = "Storage unavailable"
    retry_after = 5


class InputLost(MaskqError):
    """The job's stored input is gone from the store (deleted, or lost by the store): it cannot run."""

    code = "storage"
    title = "Input missing"


class ResourceExhausted(MaskqError):
    """The device ran out of memory; the job is put back with a delay."""

    status = 503
    code = "resources"
    title = "Resources exhausted"


class TooManyRequests(MaskqError):
    """The client is over a limit (failed authentications, waiting requests); ``retry_after`` seconds is a hint."""

    status = 429
    code = "rate_limited"
    title = "Too many requests"

    def __init__(self, detail: str, *, retry_after: int = 1, errors: list[dict[str, Any]] | None = None):
        super().__init__(detail, errors=errors)
        self.retry_after = retry_after


class ServiceUnavailable(MaskqError):
    """The service cannot take the request now; ``retry_after`` seconds is a hint."""

    status = 503
    code = "unavailable"
    title = "Service unavailable"

    def __init__(self, detail: str, *, retry_after: int = 5, errors: list[dict[str, Any]] | None = None):
        super().__init__(detail, errors=errors)
        self.retry_after = retry_after
