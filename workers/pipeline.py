"""One job through a model: stored input in, stored result out.

The job's request is the typed one its record holds (``JobRecord.request``, parsed once on the web and
read from the record once): it goes to the adapter as it is (``SegmentRequest.request``), beside its
prompts in pixels and its model options, and on to the result's writer, chosen by the job's media
(``workers/results.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from domain import masks
from domain.errors import InputLost, MaskqError
from domain.images import decode_image
from domain.keys import job_prefix
from domain.records import JobRecord
from domain.schemas import JobRequest, PromptSet
from models.adapters.base import Instance, ModelAdapter, Prompts, SegmentRequest
from models.encoder_cache import EncodingSource
from storage import Storage
from workers import metrics, results


def to_prompts(request: JobRequest) -> Prompts:
    """The request's prompts in pixels, as an adapter takes them (the mask decoded)."""
    return prompts_in_pixels(request.prompts)


def prompts_in_pixels(p: PromptSet) -> Prompts:
    """One set of prompts (a job's, or one frame's of a video job) as an adapter takes them."""
    return Prompts(
        text=tuple(p.text),
        points=tuple((float(x), float(y), int(label)) for x, y, label in p.points),
        boxes=tuple((float(x0), float(y0), float(x1), float(y1)) for x0, y0, x1, y1 in p.boxes),
        exemplars=tuple(
            (float(x0), float(y0), float(x1), float(y1), int(label)) for x0, y0, x1, y1, label in p.exemplars
        ),
        mask=masks.decode(p.mask.model_dump()) if p.mask else None,
    )


def load_request(
    record: JobRecord, storage: Storage, max_bytes: int, max_pixels: int
) -> tuple[SegmentRequest, JobRequest]:
    """The job's input, decoded, as the adapter's request; and the job's typed request (the record's own)."""
    request = record.request
    try:
        data = storage.get(record.input_key)
    except KeyError:
        raise InputLost(f"the job's input {record.input_key} is no longer in storage") from None
    image = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    return SegmentRequest(
        image=image.pixels,
        prompts=to_prompts(request),
        image_id=record.image_sha256,
        scope=record.tenant,
        options=request.adapter_options,
        request=request,
    ), request


class RunStopped(MaskqError):
    """The job stopped being this run's while it ran: canceled, or put back and taken by another run."""

    code = "stopped"


def store_result(
    record: JobRecord,
    request: JobRequest,
    image: np.ndarray,
    instances: list[Instance],
    storage: Storage,
    report: dict | None = None,
    holds: Callable[[], bool] | None = None,
) -> str:
    """Write the job's result with the writer of its media (``workers/results.py``); return the result's key.

    ``report`` is what the adapter noted about the run (``SegmentRequest.report``): kept in the result.
    ``holds``: asked first, whether this run still holds the job. A run cut off (a partition, a stall) whose
    job was taken over meanwhile writes nothing over the new run's files: :class:`RunStopped` instead.
    """
    if holds is not None and not holds():
        raise RunStopped(f"job {record.id} is no longer this run's; its result was not written")
    return results.writer_for(record.media).write(record, request, image, instances, storage, report)


def count_model_work(model: str, seconds: float, report: dict) -> None:
    """This worker's series (workers/metrics.py): the model's time, and where a SAM embedding came from."""
    series = metrics.series()
    series.inference.labels(model).observe(seconds)
    embedding = report.get("embedding")
    if embedding is not None:
        source = embedding.get("source")  # an EncodingSource, None when the encoder ran
        series.embeddings.labels(model, source.metric if isinstance(source, EncodingSource) else "miss").inc()


def discard_result(record: JobRecord, storage: Storage) -> None:
    """Delete what a job wrote besides its input (its result and masks)."""
    prefix = job_prefix(record.tenant, record.id)
    for key in storage.list(prefix):
        if key != record.input_key:
            storage.delete(key)


# What a job that ran gives: ``(result key, instance count[, seconds per phase])``.
Success = tuple[str, int] | tuple[str, int, dict[str, float]]


def run(
    record: JobRecord,
    adapter: ModelAdapter,
    storage: Storage,
    max_bytes: int,
    max_pixels: int,
    holds: Callable[[], bool] | None = None,
) -> tuple[str, int, dict[str, float]]:
    """Segment one job's image; return ``(result_key, instance count, seconds per phase)``; ``holds``: as
    :func:`store_result` takes it.

    The phases: ``load`` (the input from storage, decoded), ``encode`` (an adapter's image encoder, as it
    reports in ``SegmentRequest.timings``; SAM-family models), ``predict`` (the rest of the model's work),
    ``store`` (the result and masks written).
    """
    started = time.perf_counter()
    segment_request, request = load_request(record, storage, max_bytes, max_pixels)
    loaded = time.perf_counter()
    instances = adapter.segment([segment_request])[0]
    segmented = time.perf_counter()
    key = store_result(record, request, segment_request.image, instances, storage, segment_request.report, holds)
    encode = segment_request.timings.get("encode", 0.0)
    timings = {
        "load": loaded - started,
        "predict": segmented - loaded - encode,
        "store": time.perf_counter() - segmented,
    }
    count_model_work(adapter.name, segmented - loaded, segment_request.report)
    if "encode" in segment_request.timings:
        timings["encode"] = encode
    return key, len(instances), {phase: round(s, 4) for phase, s in timings.items()}
