"""A job's result, written by the writer of the job's media: ``result.json``, and a PNG per mask if asked.

Which writer writes it goes by the job's media (``JobRecord.media``): :func:`writer_for` picks it from
:data:`WRITERS`, and a media with no writer is a clear error, never a result in the wrong shape. Only
``image`` has one (:class:`ImageResultWriter`): a video's result is many frames stored in chunks as they
come, which ``workers/video_job.py`` writes itself (``job_runner`` sends video jobs there).

The result of an image job is::

    {"width": W, "height": H, "instances": [{"bbox": [x, y, w, h], "area": A, "score": S, "label": L,
                                             "object_id": …, "frame": …, "mask": {COCO RLE}, "polygon": […],
                                             "png_key": "…/masks/0.png"}, …], **the adapter's report}

``object_id`` and ``frame`` appear only for an instance that has them (``Instance``); ``mask``,
``polygon`` and ``png_key`` only when the request's ``outputs`` ask for them. Keys depend only on the
job id, so a job run twice overwrites its own files and never leaves a second result behind.
"""

from __future__ import annotations

import json
from typing import ClassVar

import cv2
import numpy as np

from domain import masks
from domain.errors import MaskqError
from domain.keys import job_prefix
from domain.records import JobRecord
from domain.schemas import JobRequest
from models.adapters.base import Instance
from storage import Storage


class UnknownMedia(MaskqError):
    """A job whose media no result writer here writes (a record of a newer version, say)."""


class ResultWriter:
    """Writes one job's result for one media; see the module's docstring."""

    media: ClassVar[str]

    def write(
        self,
        record: JobRecord,
        request: JobRequest,
        image: np.ndarray,
        instances: list[Instance],
        storage: Storage,
        report: dict | None = None,
    ) -> str:
        """Write the result of ``record`` (``request``: its typed request); return the result's key.

        ``report`` is what the adapter noted about the run (``SegmentRequest.report``): kept in the result.
        """
        raise NotImplementedError


class ImageResultWriter(ResultWriter):
    """One image's instances: COCO RLE masks, boxes, areas, scores, labels (and polygons, PNGs if asked)."""

    media = "image"

    def write(
        self,
        record: JobRecord,
        request: JobRequest,
        image: np.ndarray,
        instances: list[Instance],
        storage: Storage,
        report: dict | None = None,
    ) -> str:
        prefix = job_prefix(record.tenant, record.id)
        height, width = image.shape[:2]
        out = []
        for i, instance in enumerate(instances):
            rle = masks.encode(instance.mask)
            bbox, area = masks.describe(rle)
            item = {"bbox": bbox, "area": area, "score": round(float(instance.score), 4), "label": instance.label}
            # Which object (followed across steps or frames) and which frame: only when the model says.
            if instance.object_id is not None:
                item["object_id"] = instance.object_id
            if instance.frame is not None:
                item["frame"] = instance.frame
            # The model's own box (x0, y0, x1, y1), where it predicts one apart from the mask (SAM 3).
            if instance.box is not None:
                item["box"] = [round(float(v), 3) for v in instance.box]
            if "rle" in request.outputs:
                item["mask"] = rle
            if "polygon" in request.outputs:
                item["polygon"] = polygons(instance.mask)
            if "png" in request.outputs:
                png_key = item["png_key"] = f"{prefix}masks/{i}.png"
                storage.put(png_key, masks.to_png(instance.mask), "image/png")
            out.append(item)
        result = {"width": width, "height": height, "instances": out, **(report or {})}
        key = f"{prefix}result.json"
        storage.put(key, json.dumps(result).encode(), "application/json")
        return key


def polygons(mask: np.ndarray) -> list[list[float]]:
    """The outer contours of a mask as flat ``[x0, y0, x1, y1, ...]`` lists (COCO's polygon form)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


# The result writers by media.
WRITERS: dict[str, ResultWriter] = {}


def register(writer: ResultWriter) -> ResultWriter:
    """Make ``writer`` the one for its media."""
    WRITERS[writer.media] = writer
    return writer


register(ImageResultWriter())


def writer_for(media: str) -> ResultWriter:
    """The writer of ``media``'s results; :class:`UnknownMedia` when there is none."""
    try:
        return WRITERS[media]
    except KeyError:
        raise UnknownMedia(
            f"no result writer for media {media!r}: this worker writes results for "
            f"{', '.join(sorted(WRITERS)) or 'no media'}"
        ) from None
