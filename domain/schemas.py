"""The job request: its schema (pydantic) and the checks that need the image and the model.

The same models validate ``POST /v1/jobs`` and describe it in the OpenAPI
document. A request is parsed once, on the web (:func:`parse_request`); the
job's record keeps it typed (``JobRecord.request``, stored as JSON), and the
worker hands that very object to the adapter (``SegmentRequest.request``),
beside :class:`models.adapters.base.Prompts`, its prompts in pixels.

The names every layer shares are here, once: :data:`PROMPT_KINDS` (the
adapters, the manifest's routes and the catalog take theirs from it) and the
webhook events with their defaults (:data:`JOB_EVENTS`,
:data:`DEFAULT_JOB_EVENTS`; ``stores/outbox.py`` writes them into its Lua).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from config.settings import LANES
from domain import masks
from domain.errors import ValidationFailed

Lane = Literal["interactive", "default", "batch"]
Output = Literal["rle", "png", "polygon"]
DEFAULT_OUTPUTS: tuple[Output, ...] = ("rle",)

# The kinds of prompt, in the order a job that names no model is routed by (the first kind it has that
# has a route decides: models/manifest.py). The one list: PromptSet, Prompts, the routes, the catalog.
PromptKind = Literal["text", "exemplars", "mask", "boxes", "points"]
PROMPT_KINDS: tuple[PromptKind, ...] = get_args(PromptKind)

# A job's webhook events (a state move announces each: stores/outbox.py), those a webhook that names none
# gets, and a batch's.
WebhookEvent = Literal["job.started", "job.succeeded", "job.failed", "job.canceled", "job.expired"]
JOB_EVENTS: tuple[WebhookEvent, ...] = get_args(WebhookEvent)
DEFAULT_JOB_EVENTS: tuple[WebhookEvent, ...] = ("job.succeeded", "job.failed")
BatchEvent = Literal["batch.completed", WebhookEvent]
BATCH_EVENTS: tuple[BatchEvent, ...] = get_args(BatchEvent)
DEFAULT_BATCH_EVENTS: tuple[BatchEvent, ...] = ("batch.completed",)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaskRLE(Strict):
    """A COCO RLE mask: ``size`` is ``[height, width]``, ``counts`` the compressed string."""

    size: tuple[int, int]
    counts: str = Field(min_length=1)


class PromptSet(Strict):
    text: list[str] = Field(
        default_factory=list,
        description="objects by name (the objects model: COCO classes, plurals, synonyms; an unknown name is a "
        "422), or with model text-regions: the text regions whose text contains one of these",
    )
    # StrictInt, not Literal[0, 1]: pydantic's Literal takes JSON true for 1.
    points: list[tuple[float, float, Annotated[StrictInt, Field(ge=0, le=1)]]] = Field(
        default_factory=list, description="[x, y, label]; label 1 = foreground, 0 = background"
    )
    boxes: list[tuple[float, float, float, float]] = Field(default_factory=list, description="[x0, y0, x1, y1]")
    exemplars: list[tuple[float, float, float, float, Annotated[StrictInt, Field(ge=0, le=1)]]] = Field(
        default_factory=list,
        description="[x0, y0, x1, y1, label]: every instance like this box (label 1) or not like it (label 0), "
        "with the text's phrases or alone (SAM 3's exemplar prompts)",
        # Left out of the stored form when empty: a record stays readable by the version before exemplars
        # (its PromptSet forbids unknown fields) during a rolling upgrade.
        exclude_if=lambda exemplars: not exemplars,
    )
    mask: MaskRLE | None = None

    @property
    def kinds(self) -> set[str]:
        return {k for k in PROMPT_KINDS if getattr(self, k)}

    @property
    def count(self) -> int:
        return len(self.text) + len(self.points) + len(self.boxes) + len(self.exemplars) + (1 if self.mask else 0)


class FramePrompts(PromptSet):
    """Prompts on one frame of a video job (``video.prompts``): each box, the points, the mask is one object."""

    frame: StrictInt = Field(default=0, ge=0, description="the frame (0-based, in the clip's order) they are on")


class VideoOptions(Strict):
    """A video job's own options (``JobRequest.video``); the job's ``prompts`` are on frame 0."""

    frame_stride: StrictInt | None = Field(default=None, ge=1, le=1000, description="take every n-th frame")
    fps: float | None = Field(default=None, gt=0, le=240, description="take about this many frames a second")
    prompts: list[FramePrompts] = Field(
        default_factory=list, description="prompts on later frames: objects that enter the scene there"
    )
    redetect_every: StrictInt | None = Field(
        default=None,
        ge=1,
        le=10000,
        description="objects named by text are looked for again on every n-th frame the job takes (1: every "
        "one), so objects entering the scene are found; one that overlaps an object followed already is that one",
    )
    detector: str | None = Field(
        default=None,
        max_length=100,
        description="the model that finds objects named by text (default: the model text prompts go to)",
    )
    overlay: bool = Field(default=False, description="also store an MP4 of the frames taken with the masks drawn")


class Webhook(Strict):
    url: str = Field(min_length=1, max_length=2048)
    events: list[WebhookEvent] = Field(default_factory=lambda: list(DEFAULT_JOB_EVENTS))


class JobRequest(Strict):
    """The ``request`` part of ``POST /v1/jobs``; everything is optional."""

    model: str | None = None
    prompts: PromptSet = Field(default_factory=PromptSet)
    lane: Lane | None = None
    webhook: Webhook | None = None
    outputs: list[Output] = Field(default_factory=lambda: list(DEFAULT_OUTPUTS))
    deadline_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    points_per_side: StrictInt | None = Field(
        default=None,
        ge=1,
        le=64,
        description="segment everything (a SAM-family model, no prompt): a grid of this many points a side "
        "(the deployment's ceiling applies; default 16)",
    )

    video: VideoOptions | None = Field(
        default=None,
        description="for a video upload: which frames to take, and prompts on frames after the first",
        # Left out of the stored form when absent, as exemplars: an image job's record stays readable by the
        # version before video jobs during a rolling upgrade.
        exclude_if=lambda video: video is None,
    )

    @property
    def adapter_options(self) -> dict[str, Any]:
        """The options given for the model that runs the job (``SegmentRequest.options``), by name."""
        return {"points_per_side": self.points_per_side} if self.points_per_side is not None else {}


class BatchWebhook(Strict):
    """A batch's webhook: ``batch.completed`` once every job has ended; job events, if listed, for each job."""

    url: str = Field(min_length=1, max_length=2048)
    events: list[BatchEvent] = Field(default_factory=lambda: list(DEFAULT_BATCH_EVENTS))


class BatchRequest(JobRequest):
    """The ``request`` part of ``POST /v1/batches``: one job request for every image, on the batch lane."""

    webhook: BatchWebhook | None = None  # type: ignore[assignment]  # a batch's webhook takes batch events too
    lane: Lane = "batch"

    def job_request(self, prompts: PromptSet | None = None) -> JobRequest:
        """The request of one image's job (``prompts``: that image's own), typed: nothing is parsed again."""
        job_events = [e for e in (self.webhook.events if self.webhook else []) if e.startswith("job.")]
        fields = {name: getattr(self, name) for name in JobRequest.model_fields}
        webhook = Webhook(url=self.webhook.url, events=job_events) if self.webhook and job_events else None
        return JobRequest(**{**fields, "prompts": self.prompts if prompts is None else prompts, "webhook": webhook})


def parse_request(data: object) -> JobRequest:
    """Validate the request JSON's shape; a :class:`ValidationFailed` names each bad field."""
    return parse_model(JobRequest, data, "request")


StrictModel = TypeVar("StrictModel", bound=Strict)


def parse_model(model: type[StrictModel], data: object, what: str) -> StrictModel:
    """``data`` validated as ``model``; a :class:`ValidationFailed` names each bad field.

    Strict, in JSON mode: a number must be a JSON number, as the OpenAPI document says (lax mode
    would take "12" for 12); arrays still fill the tuples.
    """
    if not isinstance(data, dict):
        raise ValidationFailed(
            f"the {what} must be a JSON object", errors=[{"field": what, "message": "must be an object"}]
        )
    try:
        return model.model_validate_json(json.dumps(data), strict=True)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in err["loc"]) or what, "message": err["msg"]}
            for err in exc.errors(include_url=False)
        ]
        fields = ", ".join(sorted({e["field"] for e in errors}))
        raise ValidationFailed(f"invalid {what}: {fields}", errors=errors) from None


def check_request(
    request: JobRequest,
    *,
    width: int,
    height: int,
    prompt_kinds: frozenset[str],
    max_prompts: int,
    max_text_chars: int,
    requires_prompt: bool = False,
    max_points_per_side: int = 64,
) -> None:
    """The checks that need the decoded image's size and the model's prompt kinds."""
    errors: list[dict[str, Any]] = []
    prompts = request.prompts

    def bad(field: str, message: str) -> None:
        errors.append({"field": field, "message": message})

    if requires_prompt and not prompts.kinds:
        bad("prompts", f"model {request.model!r} needs at least one prompt of: {', '.join(sorted(prompt_kinds))}")
    for kind in sorted(prompts.kinds - prompt_kinds):
        bad(
            f"prompts.{kind}",
            f"model {request.model!r} does not support {kind} prompts "
            f"(it supports: {', '.join(sorted(prompt_kinds)) or 'none'})",
        )
    if request.points_per_side is not None:
        if prompts.kinds:
            bad("points_per_side", "is for segment-everything: give it without prompts")
        elif request.points_per_side > max_points_per_side:
            bad(
                "points_per_side",
                f"is {request.points_per_side}; at most {max_points_per_side} here "
                f"({max_points_per_side**2} decoder runs)",
            )
    if prompts.count > max_prompts:
        bad("prompts", f"{prompts.count} prompts; at most {max_prompts} are allowed")
    for i, text in enumerate(prompts.text):
        if not text.strip():
            bad(f"prompts.text.{i}", "is empty")
        elif len(text) > max_text_chars:
            bad(f"prompts.text.{i}", f"is longer than {max_text_chars} characters")
    for i, (x, y, _) in enumerate(prompts.points):
        if not (0 <= x < width and 0 <= y < height):
            bad(f"prompts.points.{i}", f"({x}, {y}) is outside the {width}x{height} image")
    boxes = [("boxes", i, box) for i, box in enumerate(prompts.boxes)]
    boxes += [("exemplars", i, exemplar[:4]) for i, exemplar in enumerate(prompts.exemplars)]
    for kind, i, (x0, y0, x1, y1) in boxes:
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            bad(
                f"prompts.{kind}.{i}",
                f"[{x0}, {y0}, {x1}, {y1}] is not a box with x0 < x1, y0 < y1 inside the {width}x{height} image",
            )
    if prompts.mask is not None:
        if list(prompts.mask.size) != [height, width]:
            bad("prompts.mask.size", f"is {list(prompts.mask.size)}; the image is [{height}, {width}]")
        else:
            try:
                masks.check_counts(prompts.mask.counts, height * width)
            except ValueError as exc:
                bad("prompts.mask.counts", str(exc))
    if errors:
        raise ValidationFailed("; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors)


assert set(LANES) == set(get_args(Lane))  # one list of lanes
