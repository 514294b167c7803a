"""A video job's masks drawn on its clip, as an MP4 stored beside its result (``video.overlay`` in the request).

Written after the last chunk, in a second pass over the clip: the frames the job took are decoded again
(``domain/videos.py``, the same sampler), each drawn with the objects its chunk holds (one chunk read at a
time: the masks are decoded from their RLE as each frame comes), and encoded (H.264, PyAV) into a temporary
file on disk, so memory stays bounded however long the clip. Drawn after the fact rather than while the
job runs, because a run that follows a dead one could not take up an encoder's state: this pass needs only
what the chunks hold, whichever run stored them.

Each object gets its own colour (by ``object_id``): its mask tinted at half strength, its box outlined and
labelled with its id. Frames are as the clip's, padded by a pixel where a side is odd (H.264 in 4:2:0
needs even sides); the overlay's rate is the rate of the frames taken.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import av
import cv2
import numpy as np

from domain import masks
from domain.videos import Frame, FrameSampler, VideoInfo, VideoLimits, decode_frames
from storage import Storage

# Distinct, saturated colours (RGB), one per object id in turn.
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180))


def colour(object_id: int) -> tuple[int, int, int]:
    return PALETTE[(object_id - 1) % len(PALETTE)]


def draw(pixels: np.ndarray, instances: list[dict[str, Any]]) -> np.ndarray:
    """The frame with each object's mask tinted, its box outlined and its id written."""
    out = pixels.astype(np.float32)
    for found in instances:
        mask = masks.decode(found["mask"])
        out[mask] = out[mask] * 0.5 + np.asarray(colour(found["object_id"]), np.float32) * 0.5
    drawn = np.clip(out, 0, 255).astype(np.uint8)
    for found in instances:
        x, y, w, h = (round(v) for v in found["bbox"])
        rgb = colour(found["object_id"])
        cv2.rectangle(drawn, (x, y), (x + w - 1, y + h - 1), rgb, 1)
        cv2.putText(drawn, str(found["object_id"]), (x + 2, y + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, rgb, 1)
    return drawn


def even(pixels: np.ndarray) -> np.ndarray:
    """Padded by a pixel (repeating the edge) on a side that is odd."""
    height, width = pixels.shape[:2]
    return (
        cv2.copyMakeBorder(pixels, 0, height % 2, 0, width % 2, cv2.BORDER_REPLICATE)
        if (height | width) % 2
        else pixels
    )


def stored_frames(storage: Storage, chunks: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every stored frame's result, in order, one chunk in memory at a time."""
    for chunk in chunks:
        yield from json.loads(storage.get(chunk["key"]))["frames"]


def write_overlay(
    storage: Storage,
    key: str,
    data: bytes,
    info: VideoInfo,
    limits: VideoLimits,
    sampler: FrameSampler,
    chunks: list[dict[str, Any]],
    rate: float,
) -> str:
    """Draw the stored masks on the frames taken and store the MP4 at ``key``; return ``key``."""
    results = stored_frames(storage, chunks)
    handle, path = tempfile.mkstemp(suffix=".mp4")
    os.close(handle)
    try:
        with av.open(path, "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=Fraction(rate).limit_denominator(1000))
            assert isinstance(stream, av.VideoStream)
            stream.width, stream.height = info.width + info.width % 2, info.height + info.height % 2
            stream.pix_fmt = "yuv420p"
            for frame in decode_frames(data, info, limits, sampler):
                result = _result_for(frame, results)
                pixels = even(draw(frame.pixels, result["instances"]))
                for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        with open(path, "rb") as file:
            storage.put(key, file.read(), "video/mp4")
    finally:
        os.unlink(path)
    return key


def _result_for(frame: Frame, results: Iterator[dict[str, Any]]) -> dict[str, Any]:
    result = next(results, None)
    if result is None or result["frame"] != frame.index:  # the chunks and the clip disagree: never draw a guess
        raise RuntimeError(f"frame {frame.index}: the stored results hold {result and result['frame']} here")
    return result
