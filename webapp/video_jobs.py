"""A video submitted to ``POST /v1/jobs``: the clip checked end to end and its request checked against it.

``webapp/jobs.py`` hands a submission here when its bytes are a video container (``domain/videos.py``
recognises MP4, MOV, WebM and Matroska by their first bytes, never by a name). Every 4xx a clip can earn
is found here, before anything is stored or queued: the clip is probed and decoded once (no frame kept),
so a corrupt, truncated or audio-only file, a codec this FFmpeg cannot decode, or a clip past any
``MASKQ_MAX_VIDEO_*`` bound is refused with the reason; and the prompts are checked against the frame
size and the frames the job will take (``frame_stride`` or ``fps``).

A video job runs on a model whose adapter can follow objects from frame to frame (``follows_video``: the
SAM family), prompted with points, boxes or a mask. Each box is one object, the points are one, the mask
is one; those in ``prompts`` are on frame 0, those in ``video.prompts`` on the frame each names. Objects
named by text are found by a detector model (``video.detector``, else the model text prompts go to: the
``objects`` pipeline), on the frame that names them and, with ``video.redetect_every``, again later;
the detector is checked here as a job of it would be (an unknown phrase is a 422).
"""

from __future__ import annotations

import hashlib
import uuid

from domain.errors import ServiceUnavailable, ValidationFailed
from domain.keys import job_prefix
from domain.records import JobRecord
from domain.schemas import JobRequest, PromptSet, VideoOptions, check_request
from domain.videos import CheckedVideo, VideoLimits, check_video
from domain.webhook_urls import check_webhook_url
from models.catalog import ModelCatalog, missing_reason
from webapp.auth import choose_lane, current_tenant
from webapp.services import Services

VIDEO_PROMPT_KINDS = frozenset({"points", "boxes", "mask"})


def new_video_job(
    s: Services, data: bytes, job_request: JobRequest, batch: str | None, cancel_after: float | None
) -> tuple[JobRecord, str, ModelCatalog]:
    """Check a clip and its request (every 4xx); ``(the job's record, the clip's media type, the catalog read)``.

    No result cache for a clip (the record has no ``cache_key``): a video job's result is many files,
    written as it goes.
    """
    settings = s.settings
    if job_request.webhook is not None:
        check_webhook_url(job_request.webhook.url, settings.webhook_allowed_networks)
    options = job_request.video
    _check_options(job_request)
    catalog = s.catalog.current()
    kinds = set(job_request.prompts.kinds).union(*(p.kinds for p in (options.prompts if options else [])))
    # The model that follows the objects: named, else the route of the prompts it follows (boxes for text alone).
    spec = catalog.spec(job_request.model or catalog.route((kinds - {"text"}) or {"boxes"}))
    if not catalog.adapter_class(spec.name).follows_video:
        raise ValidationFailed(
            f"model {spec.name!r} cannot follow objects through a video; a SAM-family model can "
            "(prompt it with points, boxes or a mask)",
            errors=[{"field": "model", "message": f"{spec.name!r} takes images only"}],
        )
    # Its files are not there: say so now. No fallback stands in for a video (none that could follow one).
    missing = catalog.missing_files(spec.name)
    if missing:
        reason = missing_reason(spec.name, missing, catalog.specs)
        raise ServiceUnavailable(
            f"model {spec.name!r} cannot run in this deployment: {reason}",
            retry_after=60,
            errors=[{"field": "model", "message": f"model {spec.name!r} is unavailable: {reason}"}],
        )
    # What needs no frame first: a request refused for its prompts costs no decode of the clip.
    _check_objects(prompts_on_frames(job_request), settings)
    detector = _check_detector(job_request, catalog) if "text" in kinds else None
    video = check_video(
        data,
        VideoLimits.from_settings(settings),
        stride=(options.frame_stride or 1) if options else 1,
        fps=options.fps if options else None,
    )
    if detector is not None:  # the record keeps which model finds the named objects, as it keeps the model
        video_options = options or VideoOptions()
        job_request = job_request.model_copy(update={"video": video_options.model_copy(update={"detector": detector})})
    elif options is not None and options.redetect_every is not None:
        raise ValidationFailed(
            "video.redetect_every is for objects named by text; this job names none",
            errors=[{"field": "video.redetect_every", "message": "no text prompt"}],
        )
    _check_prompts(job_request, video, spec.name, settings, text=detector is not None)
    lane = choose_lane(job_request.lane)
    job_id = uuid.uuid4().hex
    record = JobRecord.submitted(
        job_id,
        job_request,
        tenant=current_tenant(),
        lane=lane,
        model=spec.name,
        model_version=spec.version,
        cancel_after=cancel_after,
        input_key=f"{job_prefix(current_tenant(), job_id)}input.{video.info.extension}",
        image_sha256=hashlib.sha256(data).hexdigest(),
        width=video.info.width,
        height=video.info.height,
        batch=batch,
        media="video",
        frames_total=len(video.sampled),
        frames_done=0,
    )
    return record, video.info.media_type, catalog


def _check_options(job_request: JobRequest) -> None:
    errors = []
    options = job_request.video
    if options is not None and options.frame_stride is not None and options.fps is not None:
        errors.append({"field": "video", "message": "give frame_stride or fps, not both"})
    if job_request.points_per_side is not None:
        errors.append({"field": "points_per_side", "message": "segment everything is for images"})
    errors += [
        {"field": "outputs", "message": f"{output!r}: a video job's masks are COCO RLE only"}
        for output in job_request.outputs
        if output != "rle"
    ]
    if errors:
        raise ValidationFailed("; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors)


def _check_detector(job_request: JobRequest, catalog: ModelCatalog) -> str:
    """The model that finds the objects the job names by text; its phrases checked as a job of it checks them."""
    options = job_request.video
    name = (options.detector if options else None) or catalog.route({"text"})
    if "text" not in catalog.prompt_kinds(name):
        raise ValidationFailed(
            f"model {name!r} cannot find objects named by text; name a detector in video.detector, or a route "
            "for text prompts in the manifest",
            errors=[{"field": "video.detector", "message": f"{name!r} takes no text prompts"}],
        )
    phrases = [*job_request.prompts.text, *(t for p in (options.prompts if options else []) for t in p.text)]
    catalog.check_text(name, phrases)
    reason = catalog.unavailable(name)
    if reason is not None:
        raise ValidationFailed(
            f"model {name!r}, which finds objects named by text, cannot run in this deployment: {reason}",
            errors=[{"field": "video.detector", "message": reason}],
        )
    return name


def prompts_on_frames(job_request: JobRequest) -> list[tuple[str, int, PromptSet]]:
    """Every prompt set of a video job as ``(its field, its frame, the set)``: ``prompts`` on frame 0, then
    ``video.prompts``."""
    options = job_request.video
    on_frames: list[tuple[str, int, PromptSet]] = [("prompts", 0, job_request.prompts)]
    on_frames += [(f"video.prompts.{i}", p.frame, p) for i, p in enumerate(options.prompts if options else [])]
    return on_frames


def _check_objects(on_frames: list[tuple[str, int, PromptSet]], settings) -> None:
    """One object to follow at least, and no more prompts than a job may have (before the clip is decoded)."""
    if not any(prompts.kinds for _, _, prompts in on_frames):
        raise ValidationFailed(
            "a video job needs at least one object to follow: points, boxes, a mask or a name (on frame 0 in "
            "prompts, or on a later frame in video.prompts)",
            errors=[{"field": "prompts", "message": "give points, boxes, a mask or text"}],
        )
    total = sum(prompts.count for _, _, prompts in on_frames)
    if total > settings.max_prompts:
        raise ValidationFailed(
            f"{total} prompts; at most {settings.max_prompts} are allowed",
            errors=[{"field": "prompts", "message": f"at most {settings.max_prompts}"}],
        )


def _check_prompts(job_request: JobRequest, video: CheckedVideo, model: str, settings, text: bool) -> None:
    """Each frame's prompts: kinds the tracker takes, inside the frame, on a frame the job takes."""
    on_frames = prompts_on_frames(job_request)
    taken = set(video.sampled)
    for field, frame, prompts in on_frames:
        if not prompts.kinds:
            continue
        if frame not in taken:
            raise ValidationFailed(
                f"{field}: frame {frame} is not one the job takes (the clip has {video.frames} frames; "
                f"with its frame_stride or fps the job takes {len(taken)} of them, from frame 0)",
                errors=[{"field": f"{field}.frame", "message": f"frame {frame} is not taken"}],
            )
        try:
            check_request(
                JobRequest(model=model, prompts=PromptSet(**{k: getattr(prompts, k) for k in PromptSet.model_fields})),
                width=video.info.width,
                height=video.info.height,
                prompt_kinds=VIDEO_PROMPT_KINDS | ({"text"} if text else set()),
                max_prompts=settings.max_prompts,
                max_text_chars=settings.max_text_prompt_chars,
            )
        except ValidationFailed as exc:
            errors = [{**e, "field": e["field"].replace("prompts", field, 1)} for e in exc.errors]
            raise ValidationFailed(
                "; ".join(f"{e['field']}: {e['message']}" for e in errors) + " (on a video)", errors=errors
            ) from None
