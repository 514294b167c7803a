"""A video job through a worker: the clip streamed frame by frame through the tracker, its results stored in chunks.

``workers/job_runner.py`` sends every job whose record says ``media = "video"`` here. Frames stream
through: decode (``domain/videos.py``) → follow the objects (``models/video_tracking.py``) → encode their
masks (COCO RLE) → store, ``MASKQ_VIDEO_CHUNK_FRAMES`` frames at a time. Only the frame being worked on
and the chunk being filled (masks as RLE text) are held, so memory does not grow with the clip's length.

No lost work: each chunk is written to storage first, then named in the job's record (``chunks``, with the
run that computed it, and ``frames_done``), by the run that holds the job (fenced: a run taken over can
no longer add one). A chunk also keeps the tracker's state after its last frame. A run that follows a
dead one (recovery puts the job back) starts after the record's last chunk: it decodes the frames before
it (cheap) without running the model on them, and takes up the tracker's state where that chunk left it.
A chunk written but not yet named when the process died is simply written again, at the same key.

A canceled job stops at the next frame: the record's state is read before each one, and what the job
wrote is deleted. Redis away meanwhile (a restart, a failover, a partition) is waited for at those reads
and writes (``workers/redis_outage.py``), as a job's end waits for it: the run goes on from where it was.

When the last frame is done, ``result.json`` is assembled from the chunks, one at a time, in the layout of
YouTube-VIS (COCO for video): one annotation per object, with its mask, box, area and score on every frame
the job took (``null`` where the object is not found).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from domain import masks
from domain.errors import InputLost, ModelError
from domain.keys import job_prefix
from domain.records import JobRecord, JobState
from domain.result_keys import OVERLAY_FILE
from domain.videos import Frame, FrameSampler, VideoLimits, decode_frames, probe_video
from models.adapters.base import Instance, Prompts, SegmentRequest
from models.video_tracking import SamTracker, prompted_objects
from storage import Storage
from workers import pipeline, video_overlay
from workers.redis_outage import ride_out

log = logging.getLogger(__name__)


class VideoStopped(pipeline.RunStopped):
    """The job stopped being this run's between two frames: canceled, or taken over by another run."""


def chunk_key(record: JobRecord, start: int) -> str:
    """Where the chunk whose first frame is ``start`` is kept: it depends only on the job and the frame."""
    return f"{job_prefix(record.tenant, record.id)}video/chunk-{start:06d}.json"


@dataclass
class Progress:
    """The chunks stored so far (the record's ``chunks``) and the one being filled."""

    chunks: list[dict[str, Any]]
    pending: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> int:
        return sum(int(c["frames"]) for c in self.chunks)

    @property
    def resume_at(self) -> int:
        """The first frame of the clip not yet stored."""
        return int(self.chunks[-1]["end"]) if self.chunks else 0


def run(worker: Any, record: JobRecord, adapter: Any, storage: Storage) -> tuple[str, int, dict[str, float]]:
    """Run video job ``record`` on ``adapter`` to its stored result: ``(result key, objects, seconds per phase)``."""
    if not getattr(adapter, "follows_video", False):
        raise ModelError(f"model {adapter.name!r} cannot follow objects through a video")
    jobs, settings = worker.jobs, worker.settings
    now = jobs.get(record.id) or record  # this run's view: its attempt, and the chunks runs before it stored
    attempt = now.attempts
    started = time.perf_counter()
    try:
        data = storage.get(record.input_key)
    except KeyError:
        raise InputLost(f"the job's input {record.input_key} is no longer in storage") from None
    limits = VideoLimits.from_settings(settings)
    info = probe_video(data, limits)
    options = record.request.video
    sampler = FrameSampler((options.frame_stride or 1) if options else 1, options.fps if options else None)
    prompted = _objects_by_frame(record)
    names = _names_by_frame(record)
    redetect = options.redetect_every if options else None
    detector = worker.models.choose(options.detector, {"text"}).adapter if options and options.detector else None
    tracker = SamTracker(adapter)
    progress = Progress(list(now.chunks or []))
    if progress.chunks:
        state = json.loads(storage.get(progress.chunks[-1]["key"]))["state"]
        tracker.restore(state, info.height, info.width)
        log.info(
            "job %s: resuming at frame %d: %d frames stored by earlier runs",
            record.id,
            progress.resume_at,
            progress.done,
        )
    loaded = time.perf_counter()
    model_s = store_s = 0.0
    before: Frame | None = None
    for frame in decode_frames(data, info, limits, sampler):
        if frame.index < progress.resume_at:
            before = frame  # done by an earlier run: only decoded, for the motion into the next frame
            continue
        if before is not None:
            tracker.remember(before.pixels)
            before = None
        state_now = _through_outage(worker, lambda: jobs.status(record.id), record, "reading its state")
        if state_now != JobState.RUNNING:
            _stop(record, storage, state_now, frame.index)
        ran = time.perf_counter()
        position = progress.done + len(progress.pending)  # the frame's place among those the job takes
        named = sorted({n for at, phrases in names.items() if at <= frame.index for n in phrases})
        detected = None
        if detector is not None and named and (frame.index in names or (redetect and position % redetect == 0)):
            detected = _detect(detector, frame, named)
        instances = tracker.step(frame.index, frame.pixels, prompted.get(frame.index), detected)
        stored = time.perf_counter()
        model_s += stored - ran
        progress.pending.append(_frame_result(frame, instances))
        if len(progress.pending) >= settings.video_chunk_frames:
            _store_chunk(worker, record, storage, tracker, progress, attempt, frame.index + 1)
        store_s += time.perf_counter() - stored
    if progress.pending:
        stored = time.perf_counter()
        _store_chunk(worker, record, storage, tracker, progress, attempt, progress.pending[-1]["frame"] + 1)
        store_s += time.perf_counter() - stored
    assembled = time.perf_counter()
    if not worker.holds(record.id):  # taken over or canceled since its last chunk: nothing over the new run's
        _stop(
            record,
            storage,
            _through_outage(worker, lambda: jobs.status(record.id), record, "reading its state"),
            progress.resume_at,
        )
    overlay = None
    if options is not None and options.overlay:
        overlay = video_overlay.write_overlay(
            storage,
            f"{job_prefix(record.tenant, record.id)}{OVERLAY_FILE}",
            data,
            info,
            limits,
            FrameSampler((options.frame_stride or 1), options.fps),
            progress.chunks,
            options.fps or (info.fps or 25.0) / (options.frame_stride or 1),
        )
    key, objects = _write_result(record, storage, info, progress, tracker, sampler.seen, overlay)
    timings = {
        "load": loaded - started,
        "predict": model_s,
        "store": store_s + time.perf_counter() - assembled,
        "decode": assembled - loaded - model_s - store_s,
    }
    return key, objects, {phase: round(s, 4) for phase, s in timings.items()}


def _objects_by_frame(record: JobRecord) -> dict[int, list[tuple[str, Prompts]]]:
    """The objects prompted on each frame: the job's prompts on frame 0, ``video.prompts`` on theirs."""
    request = record.request
    sets = [(0, request.prompts)] + [(p.frame, p) for p in (request.video.prompts if request.video else [])]
    by_frame: dict[int, list[tuple[str, Prompts]]] = {}
    for frame, prompt_set in sets:
        objects = prompted_objects(pipeline.prompts_in_pixels(prompt_set.model_copy(update={"text": []})))
        by_frame.setdefault(frame, []).extend((f"{label}@{frame}" if frame else label, p) for label, p in objects)
    return by_frame


def _names_by_frame(record: JobRecord) -> dict[int, list[str]]:
    """The object names (text prompts) given on each frame."""
    request = record.request
    sets = [(0, request.prompts)] + [(p.frame, p) for p in (request.video.prompts if request.video else [])]
    by_frame: dict[int, list[str]] = {}
    for frame, prompt_set in sets:
        if prompt_set.text:
            by_frame.setdefault(frame, []).extend(prompt_set.text)
    return by_frame


def _detect(detector: Any, frame: Frame, names: list[str]) -> list[Instance]:
    """The objects of these names the detector finds on the frame (with its masks: the objects pipeline's SAM)."""
    request = SegmentRequest(image=frame.pixels, prompts=Prompts(text=tuple(names)), cache_encoding=False)
    return list(detector.segment([request])[0])


def _frame_result(frame: Frame, instances: list[Instance]) -> dict[str, Any]:
    found = []
    for instance in instances:
        rle = masks.encode(instance.mask)
        bbox, area = masks.describe(rle)
        found.append(
            {
                "object_id": instance.object_id,
                "label": instance.label,
                "score": round(float(instance.score), 4),
                "bbox": bbox,
                "area": area,
                "mask": rle,
            }
        )
    return {"frame": frame.index, "time_s": round(frame.time_s, 4), "instances": found}


def _store_chunk(
    worker: Any, record: JobRecord, storage: Storage, tracker: SamTracker, progress: Progress, attempt: int, end: int
) -> None:
    """Store the pending frames as one chunk, then name it in the record (only while this run holds the job)."""
    start = progress.pending[0]["frame"]
    chunk = {"start": start, "end": end, "frames": len(progress.pending), "attempt": attempt}
    chunk["key"] = key = chunk_key(record, start)
    body = {"chunk": chunk, "frames": progress.pending, "state": tracker.state()}
    storage.put(key, json.dumps(body).encode(), "application/json")
    chunks = [*progress.chunks, chunk]
    noted = _through_outage(
        worker,
        lambda: worker.jobs.note_progress(
            record.id, worker.owner, chunks=chunks, frames_done=progress.done + chunk["frames"]
        ),
        record,
        f"naming the chunk at frame {start}",
    )
    if not noted:
        state = _through_outage(worker, lambda: worker.jobs.status(record.id), record, "reading its state")
        _stop(record, storage, state, end)
    progress.chunks, progress.pending = chunks, []


def _through_outage(worker: Any, call, record: JobRecord, what: str):
    """``call()``, waited out while Redis is away, up to the visibility timeout (past it, the error: the
    message is still unacknowledged and recovery puts the job back, to resume after its last chunk)."""
    return ride_out(call, bound_s=worker.settings.visibility_timeout_s, what=f"job {record.id}: {what}")


def _stop(record: JobRecord, storage: Storage, state: JobState | None, frame: int) -> None:
    """The job is no longer this run's: a canceled job's files go; a job taken over keeps them for its new run."""
    if state == JobState.CANCELED:
        pipeline.discard_result(record, storage)
        log.info("job %s: canceled; stopped at frame %d", record.id, frame)
        raise VideoStopped(f"the job was canceled; it stopped at frame {frame}")
    log.info("job %s: now %s, no longer this run's; stopped at frame %d", record.id, state or "gone", frame)
    raise VideoStopped(f"the job is {state or 'gone'} and no longer this run's; stopped at frame {frame}")


def _write_result(
    record: JobRecord,
    storage: Storage,
    info: Any,
    progress: Progress,
    tracker: SamTracker,
    decoded: int,
    overlay: str | None = None,
) -> tuple[str, int]:
    """``result.json`` from the stored chunks, read one at a time: the clip, and one annotation per object."""
    frames: list[int] = []
    times: list[float] = []
    annotations: dict[int, dict[str, Any]] = {}
    series = ("segmentations", "bboxes", "areas", "scores")
    for chunk in progress.chunks:
        for result in json.loads(storage.get(chunk["key"]))["frames"]:
            position = len(frames)
            frames.append(result["frame"])
            times.append(result["time_s"])
            for found in result["instances"]:
                annotation = annotations.setdefault(
                    found["object_id"],
                    {"object_id": found["object_id"], "label": found["label"], **{s: [] for s in series}},
                )
                for name in series:
                    annotation[name].extend([None] * (position - len(annotation[name])))
                annotation["segmentations"].append(found["mask"])
                annotation["bboxes"].append(found["bbox"])
                annotation["areas"].append(found["area"])
                annotation["scores"].append(found["score"])
    lost = {t.object_id: t.lost_at for t in tracker.tracks}
    for annotation in annotations.values():
        for name in series:
            annotation[name].extend([None] * (len(frames) - len(annotation[name])))
        annotation["lost_at"] = lost.get(annotation["object_id"])
    result = {
        "width": info.width,
        "height": info.height,
        "video": {
            "format": info.format,
            "codec": info.codec,
            "fps": info.fps,
            "frames": decoded,
            "length": len(frames),
            "frame_indices": frames,
            "times_s": times,
            **({"overlay_key": overlay} if overlay else {}),  # an overlay_url in the job's document
        },
        "annotations": [annotations[k] for k in sorted(annotations)],
        "instances": [],  # the API's result always has them (an image's); a video's objects are the annotations
    }
    key = f"{job_prefix(record.tenant, record.id)}result.json"
    storage.put(key, json.dumps(result).encode(), "application/json")
    return key, len(annotations)
