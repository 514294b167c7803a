"""Test clips, encoded at test time with PyAV from the repo's photos, with what is in them known by construction.

:func:`coffee_pan` pans a window over ``coffee.png`` (scaled to half, 300 x 200) from left to right and
back, ``PAN_STEP`` pixels a frame: on frame ``i`` the window's left edge is at :func:`offset` ``(i)`` and
everything in the photo is moved left by as much, so the cup's true box on each frame is :data:`CUP`
shifted (:func:`cup_box`). The cup's box was drawn by eye on the photo (600 x 400: the cup with its handle
inside x 172-412, y 18-310), halved.

The bad clips are each one way a clip can fail, made from a good one: :func:`corrupt`, :func:`truncated`
(an MP4 cut before its index, a Matroska cut in the middle of its frames), :func:`audio_only`,
:func:`unknown_codec` (a Matroska whose codec id is no codec FFmpeg knows), :func:`lying_duration` (a
Matroska whose header says it lasts a tenth of a second).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import av
import numpy as np
from PIL import Image

PHOTOS = Path(__file__).resolve().parents[1] / "data" / "photos"  # (as tests/conftest.py: bench/video.py uses these)

WINDOW = (240, 176)  # width, height of every frame of the pan
PAN_STEP = 6  # pixels the window moves right each frame
CUP = (86.0, 9.0, 206.0, 155.0)  # the cup's box on the half-size photo (x0, y0, x1, y1)
SPOON_POINT = (182.0, 142.0)  # a point on the spoon's bowl, on the half-size photo

CONTAINERS = {
    "mp4": ("mp4", "libx264"),
    "mov": ("mov", "libx264"),
    "webm": ("webm", "libvpx"),
    "mkv": ("matroska", "libx264"),
}


def _photo() -> np.ndarray:
    image = Image.open(PHOTOS / "coffee.png").convert("RGB")
    return np.asarray(image.resize((300, 200), Image.Resampling.BILINEAR))


PAN_RANGE = 300 - WINDOW[0]  # how far the window can move over the half-size photo


def offset(frame: int) -> int:
    """The window's left edge on frame ``frame``: right ``PAN_STEP`` a frame to the photo's edge, then back."""
    position = (PAN_STEP * frame) % (2 * PAN_RANGE)
    return position if position <= PAN_RANGE else 2 * PAN_RANGE - position


def pan_frames(frames: int) -> list[np.ndarray]:
    photo = _photo()
    width, height = WINDOW
    return [np.ascontiguousarray(photo[:height, offset(i) : offset(i) + width]) for i in range(frames)]


def cup_box(frame: int) -> tuple[float, float, float, float]:
    """The cup's true box on frame ``frame`` of :func:`coffee_pan`."""
    x0, y0, x1, y1 = CUP
    return x0 - offset(frame), y0, x1 - offset(frame), y1


def spoon_point(frame: int) -> tuple[float, float]:
    return SPOON_POINT[0] - offset(frame), SPOON_POINT[1]


def encode(frames: list[np.ndarray], container: str = "mp4", fps: int = 8, audio: bool = False) -> bytes:
    """``frames`` (RGB) as a clip; ``container``: mp4, mov, webm or mkv."""
    fmt, codec = CONTAINERS[container]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        assert isinstance(stream, av.VideoStream)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18"}  # near-lossless: the frames are what the test says they are
        sound = out.add_stream("libopus" if container == "webm" else "aac", rate=48000) if audio else None
        assert sound is None or isinstance(sound, av.AudioStream)
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if sound is not None:
            _silence(out, sound, seconds=len(frames) / fps)
    return buffer.getvalue()


def _silence(out, sound, seconds: float) -> None:
    samples = 960 if sound.codec_context.name == "libopus" else 1024
    for i in range(int(seconds * 48000 / samples) + 1):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, samples), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 48000, i * samples
        for packet in sound.encode(frame):
            out.mux(packet)
    for packet in sound.encode():
        out.mux(packet)


def coffee_pan(frames: int = 8, container: str = "mp4", fps: int = 8) -> bytes:
    return encode(pan_frames(frames), container, fps)


def cup_enters(dark: int = 2, frames: int = 4, container: str = "mp4", fps: int = 8) -> bytes:
    """``dark`` black frames (no cup anywhere), then the pan's first ``frames``: the cup enters on frame ``dark``."""
    width, height = WINDOW
    black = [np.zeros((height, width, 3), np.uint8)] * dark
    return encode(black + pan_frames(frames), container, fps)


def still(frames: int, size: tuple[int, int] = (64, 48), container: str = "mp4", fps: int = 8) -> bytes:
    """A grey clip of ``frames`` frames of ``size`` (width, height): for the bounds."""
    width, height = size
    return encode([np.full((height, width, 3), 40 + 10 * (i % 10), np.uint8) for i in range(frames)], container, fps)


def audio_only(seconds: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        _silence(out, out.add_stream("aac", rate=48000), seconds)
    return buffer.getvalue()


def corrupt() -> bytes:
    """An MP4's first box, then noise."""
    return b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + np.random.default_rng(7).bytes(4000)


def truncated(container: str = "mp4") -> bytes:
    data = still(16, container=container)
    return data[: len(data) // 2]


def unknown_codec() -> bytes:
    """A Matroska clip whose codec id names no codec FFmpeg knows (same length: every size stays right)."""
    data = still(4, container="mkv")
    assert data.count(b"V_MPEG4/ISO/AVC") == 1
    return data.replace(b"V_MPEG4/ISO/AVC", b"V_MASKQ/NO/SUCH")


def lying_duration(frames: int = 24) -> bytes:
    """A Matroska clip of ``frames`` frames (at 8 fps) whose header says it lasts 0.1 s."""
    data = still(frames, container="mkv")
    at = data.find(b"\x44\x89\x88")  # Segment Info's Duration: an 8-byte float, in milliseconds
    assert at > 0
    return data[: at + 3] + struct.pack(">d", 100.0) + data[at + 11 :]
