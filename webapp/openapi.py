"""``GET /openapi.json``: the OpenAPI 3.1 description of the API, built, never written by hand.

The paths are the app's own routes (``app.url_map``), so a route cannot be
added without appearing here; the request bodies are the pydantic models the
code validates with (``domain/schemas.py``), and the answers are the response
models below, which the tests hold the real answers to. What a route means
(summary, parameters, which errors it gives) is in ``OPERATIONS``; a route
missing there is still described, with a generic answer, until it is added.
"""

from __future__ import annotations

import re
from typing import Literal

from flask import Blueprint, Flask, current_app, jsonify
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from domain import cancel_after
from domain.image_records import IMAGE_ID
from domain.schemas import BatchRequest, JobRequest, Lane, MaskRLE, PromptKind, PromptSet, Strict
from webapp.idempotency import HEADER as IDEMPOTENCY_HEADER
from webapp.idempotency import MAX_KEY_LENGTH
from webapp.images import MODEL_DESCRIPTION, ImageUpload
from webapp.services import services

bp = Blueprint("openapi", __name__)
REF = "#/components/schemas/{model}"
UNDOCUMENTED = ("/docs", "/static", "/ui", "/favicon.ico")  # pages and their files, not the API (and "/", the page)


class Document(BaseModel):
    """A response body: fields may be added over time, so clients must ignore the ones they do not know."""

    model_config = ConfigDict(extra="allow")


class ModelVersion(Document):
    name: str
    version: str | None


class Instance(Document):
    mask: MaskRLE | None = Field(None, description="COCO RLE, column-major; absent when not asked for")
    bbox: tuple[float, float, float, float] = Field(description="[x, y, w, h] in pixels of the upright image")
    area: int
    score: float
    label: str
    polygon: list[list[float]] | None = None
    png_url: str | None = None


class VideoAnnotation(Document):
    """One object followed through a video (YouTube-VIS layout): its mask, box, area, score on each frame taken."""

    object_id: int
    label: str
    segmentations: list[MaskRLE | None] = Field(description="per frame taken (video.frame_indices); null: not found")
    bboxes: list[tuple[float, float, float, float] | None]
    areas: list[int | None]
    scores: list[float | None]
    lost_at: int | None = Field(None, description="the frame it was lost on; it is not followed after it")


class VideoClip(Document):
    format: str
    codec: str
    fps: float
    frames: int = Field(description="frames in the clip")
    length: int = Field(description="frames the job took (frame_stride, fps)")
    frame_indices: list[int]
    times_s: list[float]
    overlay_url: str | None = Field(None, description="with video.overlay: an MP4 of the frames taken, masks drawn")


class Result(Document):
    width: int
    height: int
    instances: list[Instance] = Field(description="an image's instances; empty for a video (see annotations)")
    video: VideoClip | None = Field(None, description="a video job's clip")
    annotations: list[VideoAnnotation] | None = Field(None, description="a video job's objects, frame by frame")


class VideoProgress(Document):
    frames_done: int
    frames_total: int
    eta_s: float | None = Field(None, description="seconds left at the rate of the run now going")


class JobError(Document):
    code: str
    message: str


class Job(Document):
    """A job as ``GET /v1/jobs/{id}`` shows it, and as webhooks carry it."""

    id: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled", "expired"]
    lane: Lane
    model: ModelVersion
    created_at: str
    started_at: str | None
    finished_at: str | None
    queue_position: int | None = Field(None, description="queued jobs that start before this one (0: next)")
    estimated_start_at: str | None = None
    progress: VideoProgress | None = Field(None, description="a video job's frames stored so far")
    result: Result | None = None
    error: JobError | None = None
    cached: bool
    coalesced_with: str | None = Field(None, description="the identical job in flight whose result this one gets")
    degraded: bool = False
    model_used: ModelVersion | None = Field(None, description="the fallback model that ran, when degraded")
    degraded_reason: str | None = None
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "seconds: queue (once started), total (once ended); for a job that succeeded also load, encode "
            "(SAM-family models, 0 when the embedding was cached), predict, store"
        ),
    )
    traceparent: str | None = Field(None, description="the W3C trace context the job carries (sent or made at submit)")
    cancel_at: str | None = Field(
        None,
        description=(
            f"when the job is canceled (error code {cancel_after.CODE}) if it has not ended by then, queued or "
            f"running: its submit's {cancel_after.HEADER} header"
        ),
    )


class DeliveryAttempt(Document):
    attempt: int
    at: str
    status_code: int | None = None
    error: str | None = None
    duration_ms: int | None = None


class Delivery(Document):
    id: str
    event: str
    url: str
    status: Literal["pending", "succeeded", "failed", "disabled"]
    attempts: list[DeliveryAttempt] = []


class DeliveryList(Document):
    job_id: str
    deliveries: list[Delivery]


class Redelivered(Document):
    job_id: str
    redelivered: list[str]


class FieldError(Document):
    field: str
    message: str


class Problem(Document):
    """An error (RFC 9457 ``application/problem+json``); ``errors`` names each bad field."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] = []


class ModelInfo(Document):
    name: str
    version: str
    default: bool
    prompt_kinds: list[PromptKind]
    loaded: bool
    loaded_versions: list[str] = []
    fallback: str | None = None
    max_batch_size: int = 1
    providers: list[str] = Field(default_factory=list, description="the ONNX Runtime providers live workers run it on")
    devices: list[str] = Field(default_factory=list, description='where: "cpu", or "cuda:N <GPU> <UUID>"')
    error: str | None = Field(None, description="why it cannot serve: files missing, or why workers could not load it")
    available: bool = Field(True, description="whether jobs of this model run on it (else on its fallback)")
    provenance: dict | None = Field(None, description="the package its files come from, checksums and licence")
    steps: list[str] | None = Field(None, description="a pipeline's models, run in order (absent for one model)")


class ModelList(Document):
    models: list[ModelInfo]
    default: str | None = Field(None, description="the model of a job that names none and has no route")
    routes: dict[str, str] = Field(
        default_factory=dict,
        description="a job that names no model goes by its prompts: kind -> model (text: objects by name; "
        "reading text in the image is the model text-regions, named)",
    )
    gates: dict[str, dict] = Field(default_factory=dict, description="each worker's resource gate")
    manifest_error: str | None = None


class Health(Document):
    status: str


class Readiness(Document):
    status: Literal["ready", "not ready"]
    checks: dict[str, str] = Field(description="redis, storage: ok or what is wrong in a word; workers: how many")


class AdminStatus(Document):
    checks: dict[str, str]
    detail: dict[str, str] = Field(description="the error texts behind checks that are not ok")
    workers: list[dict] = Field(description="each worker process's heartbeat")
    gates: dict[str, dict] = Field(description="each worker's resource gate")


class BatchJob(Document):
    id: str
    file_name: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled", "expired"]


class Rejected(Document):
    file_name: str
    status: int = Field(description="the HTTP status ``POST /v1/jobs`` would have answered for this image")
    detail: str


class Batch(Document):
    """A batch as ``GET /v1/batches/{id}`` shows it, and as its ``batch.completed`` webhook carries it."""

    id: str
    status: Literal["receiving", "running", "canceling", "completed", "canceled"]
    lane: Lane
    model: str | None
    total: int = Field(description="images that became jobs")
    counts: dict[str, int] = Field(description="jobs by status")
    done: int = Field(description="jobs that have ended")
    progress: float = Field(description="done / total")
    eta_s: float | None = Field(None, description="seconds until the last job ends, at the rate so far")
    estimated_completion_at: str | None = None
    rejected: list[Rejected] = Field(description="images refused at upload, each with its problem")
    created_at: str
    completed_at: str | None
    canceled_at: str | None
    coco_url: str
    jobs: list[BatchJob]


class Coco(Document):
    """COCO results: ``images``, ``annotations`` (RLE ``segmentation``), ``categories``, and ``failures``."""

    images: list[dict]
    annotations: list[dict]
    categories: list[dict]
    failures: list[dict]


class MultipartBatch(BaseModel):
    """``POST /v1/batches``: image files (``images``, repeatable) and/or one zip or tar ``archive``."""

    images: list[bytes] = Field(default_factory=list, description="image files; their names label the results")
    archive: bytes | None = Field(None, description="a zip or tar (.gz/.bz2/.xz) of images")
    request: BatchRequest = Field(default_factory=BatchRequest, description="JSON text: one request for every image")
    prompts: dict[str, PromptSet] = Field(
        default_factory=dict, description="JSON text: file name -> that image's prompts"
    )


class InlineImage(Strict):
    base64: str = Field(description="the image file's bytes, base64-encoded")


class JsonSubmission(JobRequest):
    """``POST /v1/jobs`` as ``application/json``: the request with the image inline."""

    image: InlineImage


class JsonImageIdSubmission(JobRequest):
    """``POST /v1/jobs`` as ``application/json`` naming an image stored with ``POST /v1/images``: no upload, and
    when the image's encoding is ready (SAM-family models) only the decoder runs."""

    image_id: str = Field(pattern=IMAGE_ID.pattern, description="the id POST /v1/images answered (the image's sha256)")


class MultipartImage(BaseModel):
    """``POST /v1/images`` as ``multipart/form-data``: the image file, and optionally the model."""

    image: bytes = Field(description="the image file (JPEG, PNG, WebP, BMP or TIFF)")
    model: str | None = Field(None, min_length=1, max_length=200, description=MODEL_DESCRIPTION)


class JsonImage(ImageUpload):
    """``POST /v1/images`` as ``application/json``: the image inline, and optionally the model."""

    image: InlineImage


class StoredImage(Document):
    """An image stored with ``POST /v1/images``, as ``GET /v1/images/{id}`` shows it."""

    id: str = Field(description="the image's sha256 within its tenant: jobs name it as image_id")
    sha256: str
    width: int = Field(description="of the upright (EXIF-applied) image")
    height: int
    bytes: int
    media_type: str
    model: str | None = Field(description="the model whose encoder runs ahead; null: none (nothing to encode)")
    encoding: Literal["none", "queued", "ready", "failed", "evicted"] = Field(
        description=(
            "none: no encoder to run ahead; queued: the encode-only task is queued or running; ready: the embedding "
            "is in the shared encoder cache, a job on the image runs only the decoder; failed: see error (a job "
            "encodes it itself); evicted: it was ready and the cache let it go (a job encodes it again; POST the "
            "image again to encode it ahead)"
        )
    )
    created_at: str
    expires_at: str = Field(description="when it is deleted unless used again (an upload or a job naming it)")
    encoded_at: str | None = None
    encode_s: float | None = Field(None, description="seconds the encode-only task took")
    error: str | None = None


class MultipartSubmission(BaseModel):
    """``POST /v1/jobs`` as ``multipart/form-data``: the image file and the request as JSON text."""

    image: bytes = Field(
        description="the image file (JPEG, PNG, WebP, BMP or TIFF), or a video (MP4, MOV, WebM or Matroska): "
        "a video job follows its prompted objects through every frame it takes"
    )
    request: JobRequest = Field(default_factory=JobRequest, description="JSON text; may be left out")


REQUEST_MODELS = (JsonSubmission, JsonImageIdSubmission, MultipartSubmission, MultipartBatch, MultipartImage, JsonImage)
RESPONSE_MODELS = (
    Job,
    Batch,
    Coco,
    Problem,
    ModelList,
    Health,
    Readiness,
    AdminStatus,
    DeliveryList,
    Redelivered,
    StoredImage,
)

ERRORS = {
    400: "Bad request: unreadable input",
    401: "No API key, or an unknown one",
    403: "The key is revoked, or may not use the lane asked for",
    404: "No such job or image (or another tenant's)",
    409: "The job's (or batch's) state does not allow this",
    413: "The image (or batch) is too large",
    415: "Not an image type the service reads",
    422: "The request names something invalid",
    429: "Over the rate limit; retry after Retry-After seconds",
    503: "Busy or a dependency is down; retry later",
}
V1_ERRORS = (401, 403, 429, 503)
RATE_HEADERS = {
    name: {"$ref": f"#/components/headers/{name}"}
    for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
}


def json_answer(model: str, description: str, headers: dict | None = None, media: str = "application/json") -> dict:
    answer = {"description": description, "content": {media: {"schema": {"$ref": REF.format(model=model)}}}}
    if headers:
        answer["headers"] = headers
    return answer


def error_answers(*statuses: int) -> dict:
    return {str(code): {"$ref": f"#/components/responses/{code}"} for code in statuses}


def _job_answers(*statuses: int, created: bool = False) -> dict:
    headers = {**RATE_HEADERS, "Location": {"schema": {"type": "string"}}} if created else RATE_HEADERS
    answers = {"200": json_answer("Job", "The job", headers)}
    if created:
        answers["202"] = json_answer("Job", "Accepted and queued", headers)
    return {**answers, **error_answers(*sorted({*statuses, *V1_ERRORS}))}


def _events_operation(operation_id: str, path_id: dict, summary: str, events: tuple[str, ...]) -> dict:
    """A live event stream's operation (webapp/events.py); its schema is one event's."""
    last_event_id = {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "description": "resume: the id of the last event seen; only newer events follow",
        "schema": {"type": "string", "maxLength": 40},
    }
    event = {
        "type": "object",
        "required": ["event", "id", "data"],
        "description": (
            "one event; comment lines are heartbeats. The server closes the stream after its end event, or "
            "after MASKQ_MAX_STREAM_S: reconnect with Last-Event-ID"
        ),
        "properties": {
            "event": {"enum": list(events)},
            "id": {"type": "string"},
            "data": {"type": "string", "contentMediaType": "application/json"},
        },
    }
    stream = {"text/event-stream": {"schema": event}}
    return {
        "summary": summary,
        "operationId": operation_id,
        "parameters": [path_id, last_event_id],
        "responses": {
            "200": {"description": "The event stream", "headers": RATE_HEADERS, "content": stream},
            "204": {"description": "Last-Event-ID is the end event's: nothing more will come"},
            **error_answers(400, 404, *V1_ERRORS),
        },
    }


def _operations(max_wait_s: int) -> dict[tuple[str, str], dict]:
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    batch_id = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
    cancel_after_header = {
        "name": cancel_after.HEADER,
        "in": "header",
        "required": False,
        "description": (
            f"cancel the job (each job of a batch) if it has not ended this long after its submit, "
            f"queued or running: 30s, 5m, 1h30m or plain seconds, {cancel_after.MIN_S:g} s to "
            f"{cancel_after.MAX_S / 3600:g} h; error code {cancel_after.CODE}"
        ),
        "schema": {"type": "string", "pattern": cancel_after.PATTERN, "maxLength": cancel_after.MAX_LENGTH},
    }
    image_headers = {**RATE_HEADERS, "Location": {"schema": {"type": "string"}}}
    return {
        ("/v1/jobs", "post"): {
            "summary": "Submit a job",
            "operationId": "submitJob",
            "parameters": [
                {
                    "name": IDEMPOTENCY_HEADER,
                    "in": "header",
                    "required": False,
                    "description": "the same key and body within 24 h return the same job",
                    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
                },
                {
                    "name": "Prefer",
                    "in": "header",
                    "required": False,
                    "description": f"wait=N (RFC 7240; N ≤ {max_wait_s}): answer 200 with the ended job if "
                    "it ends within N seconds, else 202 as usual",
                    "schema": {"type": "string"},
                },
                cancel_after_header,
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {"$ref": REF.format(model="MultipartSubmission")},
                        "encoding": {"request": {"contentType": "application/json"}},
                    },
                    "application/json": {
                        "schema": {
                            "oneOf": [
                                {"$ref": REF.format(model="JsonSubmission")},
                                {"$ref": REF.format(model="JsonImageIdSubmission")},
                            ]
                        }
                    },
                },
            },
            "responses": _job_answers(400, 409, 413, 415, 422, created=True),
        },
        ("/v1/images", "post"): {
            "summary": "Store an image once and start its image encoder now; jobs then name it as image_id",
            "operationId": "uploadImage",
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {"schema": {"$ref": REF.format(model="MultipartImage")}},
                    "application/json": {"schema": {"$ref": REF.format(model="JsonImage")}},
                },
            },
            "responses": {
                "201": json_answer("StoredImage", "Stored; its encoding queued", image_headers),
                "200": json_answer("StoredImage", "Stored before (the same bytes): used now", image_headers),
                **error_answers(400, 413, 415, 422, *V1_ERRORS),
            },
        },
        ("/v1/images/{image_id}", "get"): {
            "summary": "A stored image, and whether its embedding is ready",
            "operationId": "getImage",
            "parameters": [{"name": "image_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": json_answer("StoredImage", "The image", RATE_HEADERS),
                **error_answers(404, *V1_ERRORS),
            },
        },
        ("/v1/jobs/{job_id}", "get"): {
            "summary": "Read a job, waiting up to `wait` seconds for it to end",
            "operationId": "getJob",
            "parameters": [
                job_id,
                {
                    "name": "wait",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "number", "minimum": 0, "maximum": max_wait_s},
                },
            ],
            "responses": _job_answers(400, 404),
        },
        ("/v1/jobs/{job_id}", "delete"): {
            "summary": "Cancel a job",
            "operationId": "cancelJob",
            "parameters": [job_id],
            "responses": _job_answers(404, 409),
        },
        ("/v1/jobs/{job_id}/files/{name}", "get"): {
            "summary": "Fetch one of a job's files (a PNG mask)",
            "operationId": "getJobFile",
            "parameters": [job_id, {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": {
                    "description": "The file",
                    "headers": RATE_HEADERS,
                    "content": {
                        media: {"schema": {"type": "string", "format": "binary"}}
                        for media in ("image/png", "application/octet-stream")
                    },
                },
                **error_answers(404, *V1_ERRORS),
            },
        },
        ("/v1/jobs/{job_id}/deliveries", "get"): {
            "summary": "The job's webhook deliveries and every attempt",
            "operationId": "listDeliveries",
            "parameters": [job_id],
            "responses": {
                "200": json_answer("DeliveryList", "The delivery log", RATE_HEADERS),
                **error_answers(404, *V1_ERRORS),
            },
        },
        ("/v1/jobs/{job_id}/deliveries/redeliver", "post"): {
            "summary": "Send failed or disabled deliveries again",
            "operationId": "redeliver",
            "parameters": [job_id],
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {
                        "schema": {"type": "object", "properties": {"delivery_id": {"type": "string"}}}
                    }
                },
            },
            "responses": {
                "202": json_answer("Redelivered", "Queued again", RATE_HEADERS),
                **error_answers(400, 404, 409, *V1_ERRORS),
            },
        },
        ("/v1/batches", "post"): {
            "summary": "Submit many images as one batch (one job each, on the batch lane)",
            "operationId": "submitBatch",
            "parameters": [
                {
                    "name": IDEMPOTENCY_HEADER,
                    "in": "header",
                    "required": False,
                    "description": "the same key and upload within 24 h return the same batch",
                    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
                },
                cancel_after_header,
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {"$ref": REF.format(model="MultipartBatch")},
                        "encoding": {
                            "request": {"contentType": "application/json"},
                            "prompts": {"contentType": "application/json"},
                        },
                    }
                },
            },
            "responses": {
                "202": json_answer("Batch", "Accepted: its jobs are queued", RATE_HEADERS),
                "200": json_answer("Batch", "The batch an earlier identical request made", RATE_HEADERS),
                **error_answers(400, 409, 413, 415, 422, *V1_ERRORS),
            },
        },
        ("/v1/batches/{batch_id}", "get"): {
            "summary": "A batch's progress: counts by status, ETA, its jobs",
            "operationId": "getBatch",
            "parameters": [batch_id],
            "responses": {"200": json_answer("Batch", "The batch", RATE_HEADERS), **error_answers(404, *V1_ERRORS)},
        },
        ("/v1/batches/{batch_id}", "delete"): {
            "summary": "Cancel a batch's queued jobs",
            "operationId": "cancelBatch",
            "parameters": [batch_id],
            "responses": {
                "200": json_answer("Batch", "The batch", RATE_HEADERS),
                **error_answers(404, 409, *V1_ERRORS),
            },
        },
        ("/v1/batches/{batch_id}/coco", "get"): {
            "summary": "A batch's finished results as COCO JSON",
            "operationId": "getBatchCoco",
            "parameters": [batch_id],
            "responses": {"200": json_answer("Coco", "COCO results", RATE_HEADERS), **error_answers(404, *V1_ERRORS)},
        },
        ("/v1/jobs/{job_id}/events", "get"): _events_operation(
            "getJobEvents",
            job_id,
            "A job's live progress as Server-Sent Events: `state` (id m: the job document "
            "after its m-th move), `position` (id m.k: a queued job's new place), then `end` (the final document)",
            ("state", "position", "end"),
        ),
        ("/v1/batches/{batch_id}/events", "get"): _events_operation(
            "getBatchEvents",
            batch_id,
            "A batch's live progress as Server-Sent Events: `progress` (id "
            "{done}-{status}: the batch without its job list) as its jobs end, then `end` (the batch document)",
            ("progress", "end"),
        ),
        ("/v1/models", "get"): {
            "summary": "The models this deployment serves",
            "operationId": "listModels",
            "responses": {"200": json_answer("ModelList", "The models", RATE_HEADERS), **error_answers(*V1_ERRORS)},
        },
        ("/v1/admin/status", "get"): {
            "summary": "Workers, gates and error texts, for operators (an admin key)",
            "operationId": "adminStatus",
            "responses": {
                "200": json_answer("AdminStatus", "The service's internals", RATE_HEADERS),
                **error_answers(*V1_ERRORS),
            },
        },
        ("/healthz", "get"): {
            "summary": "The process is alive",
            "operationId": "health",
            "security": [],
            "responses": {"200": json_answer("Health", "Alive")},
        },
        ("/readyz", "get"): {
            "summary": "Redis, storage and a worker are ready",
            "operationId": "ready",
            "security": [],
            "responses": {"200": json_answer("Readiness", "Ready"), "503": json_answer("Readiness", "Not ready")},
        },
        ("/metrics", "get"): {
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "security": [],
            "responses": {
                "200": {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        },
        ("/openapi.json", "get"): {
            "summary": "This document",
            "operationId": "openapi",
            "security": [],
            "responses": {
                "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}},
                **error_answers(429),
            },
        },
    }


def describe(**by_method: dict):
    """Describe a view's operations where the view is: ``@describe(get={"summary": ..., "responses": ...})``.

    For routes of other modules; :func:`json_answer` and :func:`error_answers` build the answers.
    """

    def mark(view):
        view.openapi = by_method
        return view

    return mark


def _generic(view) -> dict:
    # A route nobody has described yet: say what little is sure, so the document stays true.
    return {
        "summary": (view.__doc__ or "").strip().split("\n")[0] or "Undocumented",
        "responses": {
            "default": {
                "description": "See the route's module",
                "content": {"application/json": {}, "application/problem+json": {}},
            }
        },
    }


def _path(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def build_document(app: Flask) -> dict:
    """The OpenAPI document of ``app``'s routes (call inside an app context)."""
    settings = services().settings
    known = _operations(settings.max_wait_s)
    _, defs = models_json_schema(
        [(m, "validation") for m in REQUEST_MODELS] + [(m, "serialization") for m in RESPONSE_MODELS], ref_template=REF
    )
    paths: dict[str, dict] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static" or rule.rule.startswith(UNDOCUMENTED) or rule.rule == "/":
            continue
        path = _path(rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            view = app.view_functions[rule.endpoint]
            operation = (
                known.get((path, method.lower())) or getattr(view, "openapi", {}).get(method.lower()) or _generic(view)
            )
            if path.startswith("/v1/") and "parameters" not in operation and rule.arguments:
                operation["parameters"] = [
                    {"name": a, "in": "path", "required": True, "schema": {"type": "string"}}
                    for a in sorted(rule.arguments)
                ]
            paths.setdefault(path, {})[method.lower()] = operation
    problem = {"application/problem+json": {"schema": {"$ref": REF.format(model="Problem")}}}
    retry = {"Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 0}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "maskq",
            "version": "1",
            "description": "Asynchronous prompt-driven image segmentation jobs.",
        },
        "servers": [{"url": settings.public_url or "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API key from `maskq keys create`"}
            },
            "headers": {
                name: {"schema": {"type": "integer"}, "description": what}
                for name, what in (
                    ("X-RateLimit-Limit", "requests allowed in the window"),
                    ("X-RateLimit-Remaining", "requests left in the window"),
                    ("X-RateLimit-Reset", "when the window ends (Unix time)"),
                )
            },
            "responses": {
                str(code): {
                    "description": what,
                    "content": problem,
                    **({"headers": retry} if code in (429, 503) else {}),
                }
                for code, what in ERRORS.items()
            },
        },
    }


@bp.get("/openapi.json")
def openapi_document():
    document = current_app.extensions.get("maskq.openapi")
    if document is None:
        document = current_app.extensions["maskq.openapi"] = build_document(current_app)
    return jsonify(document)
