"""Turning uploaded bytes into a stream of RGB frames, refusing what is not a usable clip.

The video twin of ``domain/images.py``, used the same two ways: by the web, to refuse a bad clip before
anything is queued (:func:`check_video` decodes it once, end to end, keeping no frame), and by the worker,
to stream the stored clip through the model one frame at a time (:func:`decode_frames`), so memory does
not grow with the clip's length.

The checks run in order of cost: the bytes, the magic bytes (MP4, MOV, WebM, Matroska: never a name or a
declared type), the container's header (a video stream, a codec this FFmpeg can decode, the pixels per
frame, the duration and the frame count it declares), then the decode, which enforces the same bounds
again frame by frame: a header can lie about all of them. A clip that decodes to fewer frames than its
header's duration holds is truncated.

PyAV (``av``, FFmpeg's libraries in its wheel) does the reading; no system FFmpeg is needed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import av
import numpy as np

from config.settings import Settings
from domain.errors import CorruptVideo, PayloadTooLarge, UnsupportedVideo

# Container → (format name, media type, file extension).
MP4 = ("MP4", "video/mp4", "mp4")
MOV = ("MOV", "video/quicktime", "mov")
WEBM = ("WEBM", "video/webm", "webm")
MKV = ("MKV", "video/x-matroska", "mkv")
EBML_MAGIC = b"\x1a\x45\xdf\xa3"
DOCTYPE = b"\x42\x82"  # the EBML header's DocType element: "webm" or "matroska"
# QuickTime files from before ``ftyp`` start straight with one of these atoms.
QUICKTIME_ATOMS = (b"moov", b"mdat", b"wide", b"free", b"skip")

# What FFmpeg (through PyAV) raises for bad data: its own errors (they subclass OSError or ValueError),
# and the few Python ones a broken stream reaches. Never ``Exception``: a time limit must keep its meaning.
CORRUPT_DATA_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError, IndexError, KeyError, TypeError)

# A decoded clip may end this much short of its header's duration (the last frame's own length, rounding)
# before it counts as truncated.
TRUNCATION_SLACK_FRAMES = 2


@dataclass(frozen=True)
class VideoLimits:
    """The bounds a clip must keep (``MASKQ_MAX_VIDEO_*``)."""

    max_bytes: int
    max_duration_s: float
    max_frames: int
    max_pixels: int

    @classmethod
    def from_settings(cls, settings: Settings) -> VideoLimits:
        return cls(
            max_bytes=settings.max_video_bytes,
            max_duration_s=settings.max_video_duration_s,
            max_frames=settings.max_video_frames,
            max_pixels=settings.max_video_pixels,
        )


@dataclass(frozen=True)
class VideoInfo:
    """What a clip's header says, checked against the limits."""

    format: str
    media_type: str
    extension: str
    codec: str
    width: int
    height: int
    fps: float  # the stream's average rate (0 when the header gives none)
    duration_s: float | None
    frames: int | None  # the header's frame count, where the container keeps one (MP4, MOV)


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its index in the clip (0-based, presentation order), its time, its pixels."""

    index: int
    time_s: float
    pixels: np.ndarray  # H x W x 3, uint8 RGB


@dataclass(frozen=True)
class CheckedVideo:
    """A clip decoded end to end at submission: its header, its real frame count, the frames a job takes."""

    info: VideoInfo
    frames: int
    sampled: tuple[int, ...]


def sniff_video(data: bytes) -> tuple[str, str, str] | None:
    """``(format, media type, extension)`` from the first bytes; None when they are no video container here."""
    if data[4:8] == b"ftyp":
        return MOV if data[8:12] == b"qt  " else MP4
    if data[4:8] in QUICKTIME_ATOMS:
        return MOV
    if data[:4] == EBML_MAGIC:
        at = data.find(DOCTYPE, 4, 64)
        if at >= 0:
            length = data[at + 2] & 0x7F  # a one-byte EBML size (0x80 | n) is how every muxer writes it
            doctype = data[at + 3 : at + 3 + length]
            return WEBM if doctype == b"webm" else MKV
        return MKV
    return None


class FrameSampler:
    """Which decoded frames a job takes: every ``stride``-th, or about ``fps`` a second by their times.

    By time rather than by index for ``fps``: a variable-rate clip still gives evenly spaced samples.
    """

    def __init__(self, stride: int = 1, fps: float | None = None):
        self.stride = stride
        self.fps = fps
        self._last_slot: int | None = None
        self._start: float | None = None
        self.seen = 0  # frames offered so far: the clip's decoded frame count, once it is through

    def take(self, index: int, time_s: float) -> bool:
        self.seen += 1
        if self.fps is None:
            return index % self.stride == 0
        if self._start is None:
            self._start = time_s
        slot = math.floor((time_s - self._start) * self.fps + 1e-6)
        if slot == self._last_slot:
            return False
        self._last_slot = slot
        return True


def probe_video(data: bytes, limits: VideoLimits) -> VideoInfo:
    """Check ``data``'s bytes, container and header against ``limits``; no frame is decoded."""
    if not data:
        raise CorruptVideo("the video is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"the video is {len(data)} bytes; the limit is {limits.max_bytes}")
    kind = sniff_video(data)
    if kind is None:
        raise UnsupportedVideo("the upload is not an MP4, MOV, WebM or Matroska video")
    fmt, media_type, extension = kind
    with (
        _as_clip_errors(fmt, lambda: "be read (corrupt or truncated)"),
        av.open(io.BytesIO(data), mode="r") as container,
    ):
        return _read_header(container, fmt, media_type, extension, limits)


@contextmanager
def _as_clip_errors(fmt: str, could_not: Callable[[], str]) -> Iterator[None]:
    """PyAV's failures as the clip's 4xx: a codec with no decoder here 415, any other 400 ("cannot
    {could_not()}"); the 4xx of this module pass through."""
    try:
        yield
    except (PayloadTooLarge, UnsupportedVideo, CorruptVideo):
        raise
    except av.DecoderNotFoundError as exc:
        raise UnsupportedVideo(f"the {fmt} video's codec cannot be decoded here: {exc}") from None
    except CORRUPT_DATA_ERRORS as exc:
        raise CorruptVideo(f"the {fmt} video cannot {could_not()}: {exc}") from None


def _read_header(container: Any, fmt: str, media_type: str, extension: str, limits: VideoLimits) -> VideoInfo:
    streams = container.streams.video
    if not streams:
        others = ", ".join(sorted({s.type for s in container.streams})) or "none"
        raise UnsupportedVideo(f"the {fmt} file holds no video stream (its streams: {others})")
    stream = streams[0]
    codec = stream.codec_context.name if stream.codec_context is not None else None
    if not codec or codec not in av.codecs_available:
        raise UnsupportedVideo(f"the {fmt} video's codec ({codec or 'unknown'}) cannot be decoded here")
    width, height = int(stream.width or 0), int(stream.height or 0)
    if width <= 0 or height <= 0:
        raise CorruptVideo(f"the {fmt} video's header gives no frame size")
    if width * height > limits.max_pixels:
        raise PayloadTooLarge(
            f"the video's frames are {width}x{height} pixels; the limit is {limits.max_pixels} pixels a frame"
        )
    duration = _duration_s(container, stream)
    if duration is not None and duration > limits.max_duration_s:
        raise PayloadTooLarge(f"the video lasts {duration:.2f} s; the limit is {limits.max_duration_s:g} s")
    frames = int(stream.frames) or None
    if frames is not None and frames > limits.max_frames:
        raise PayloadTooLarge(f"the video has {frames} frames; the limit is {limits.max_frames}")
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    if frames is None and duration is not None and fps and duration * fps > limits.max_frames + 1:
        raise PayloadTooLarge(
            f"the video has about {duration * fps:.0f} frames ({duration:.2f} s at {fps:g} fps); "
            f"the limit is {limits.max_frames}"
        )
    return VideoInfo(fmt, media_type, extension, codec, width, height, fps, duration, frames)


def _duration_s(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / av.time_base
    return None


def decode_frames(
    data: bytes, info: VideoInfo, limits: VideoLimits, sampler: FrameSampler | None = None, rgb: bool = True
) -> Iterator[Frame]:
    """The clip's frames that ``sampler`` takes, one at a time, every bound enforced as they come.

    ``rgb``: convert each frame to RGB pixels (the worker); without, the frames are decoded and dropped
    (the web's check, which needs only that they decode): ``Frame.pixels`` is then an empty array.
    """
    sampler = sampler or FrameSampler()
    count, last_time = 0, 0.0
    with (
        _as_clip_errors(info.format, lambda: f"be decoded at frame {count}"),
        av.open(io.BytesIO(data), mode="r") as container,
    ):
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            count += 1
            if count > limits.max_frames:
                raise PayloadTooLarge(f"the video has more than {limits.max_frames} frames (its header said less)")
            if frame.width != info.width or frame.height != info.height:
                raise _frame_size_error(frame.width, frame.height, info, limits)
            fps = info.fps or 25.0
            time_s = float(frame.time) if frame.time is not None else (count - 1) / fps
            if time_s > limits.max_duration_s:
                raise PayloadTooLarge(f"the video runs past {limits.max_duration_s:g} s (its header said less)")
            last_time = time_s
            if sampler.take(count - 1, time_s):
                pixels = frame.to_ndarray(format="rgb24") if rgb else np.empty((0, 0, 3), np.uint8)
                yield Frame(count - 1, time_s, pixels)
    _check_complete(count, last_time, info)


def _frame_size_error(width: int, height: int, info: VideoInfo, limits: VideoLimits) -> Exception:
    if width * height > limits.max_pixels:
        return PayloadTooLarge(
            f"a frame of the video is {width}x{height} pixels (its header said {info.width}x{info.height}); "
            f"the limit is {limits.max_pixels} pixels a frame"
        )
    return CorruptVideo(f"the video's frames change size ({info.width}x{info.height}, then {width}x{height})")


def _check_complete(count: int, last_time: float, info: VideoInfo) -> None:
    """A clip that stops well short of what its header declares is truncated (an MKV cut off still opens)."""
    if count == 0:
        raise CorruptVideo(f"the {info.format} video has no frame that decodes (truncated or corrupt)")
    frame_s = 1 / info.fps if info.fps else 0.04
    if info.duration_s is not None and last_time + (1 + TRUNCATION_SLACK_FRAMES) * frame_s < info.duration_s:
        raise CorruptVideo(
            f"the {info.format} video is truncated: its header says {info.duration_s:.2f} s, "
            f"its frames stop at {last_time:.2f} s"
        )
    if info.frames is not None and count + TRUNCATION_SLACK_FRAMES < info.frames:
        raise CorruptVideo(
            f"the {info.format} video is truncated: its header says {info.frames} frames, {count} decode"
        )


def check_video(data: bytes, limits: VideoLimits, stride: int = 1, fps: float | None = None) -> CheckedVideo:
    """Probe ``data`` and decode it end to end (keeping no frame): every 4xx a clip can earn, before queuing."""
    info = probe_video(data, limits)
    sampler = FrameSampler(stride, fps)
    sampled = tuple(frame.index for frame in decode_frames(data, info, limits, sampler, rgb=False))
    return CheckedVideo(info, sampler.seen, sampled)
