"""Reading clips (domain/videos.py): each container by its bytes, every bound from the header and again while
decoding, and every way a clip is unusable a clear input error. The clips are encoded here (tests/support/clips.py)."""

from __future__ import annotations

import pytest

from domain.errors import CorruptVideo, PayloadTooLarge, UnsupportedVideo
from domain.videos import FrameSampler, VideoLimits, check_video, decode_frames, probe_video, sniff_video
from tests.support import clips

ROOMY = VideoLimits(max_bytes=10**8, max_duration_s=60, max_frames=1000, max_pixels=10**7)


def limits(**bounds) -> VideoLimits:
    return VideoLimits(**{**ROOMY.__dict__, **bounds})


@pytest.mark.parametrize(
    ("container", "fmt", "media_type", "codec"),
    [
        ("mp4", "MP4", "video/mp4", "h264"),
        ("mov", "MOV", "video/quicktime", "h264"),
        ("webm", "WEBM", "video/webm", "vp8"),
        ("mkv", "MKV", "video/x-matroska", "h264"),
    ],
)
def test_each_container_is_recognised_by_its_bytes_and_its_frames_come_back_in_order(container, fmt, media_type, codec):
    data = clips.coffee_pan(4, container)
    assert sniff_video(data)[:2] == (fmt, media_type)
    info = probe_video(data, ROOMY)
    assert (info.format, info.codec, info.width, info.height, info.fps) == (fmt, codec, 240, 176, 8.0)
    frames = list(decode_frames(data, info, ROOMY))
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert all(f.pixels.shape == (176, 240, 3) for f in frames)
    # The pan moved the photo PAN_STEP pixels left each frame: frame 1 is frame 0 shifted (within the codec's loss).
    shift = clips.PAN_STEP
    difference = abs(frames[1].pixels[:, :-shift].astype(int) - frames[0].pixels[:, shift:].astype(int)).mean()
    assert difference < 6, difference


def test_images_and_other_bytes_are_no_video():
    assert sniff_video(b"\x89PNG\r\n\x1a\n" + b"\0" * 32) is None
    with pytest.raises(UnsupportedVideo, match="not an MP4, MOV, WebM or Matroska"):
        probe_video(b"GIF89a" + b"\0" * 64, ROOMY)


@pytest.mark.parametrize(
    ("make", "error", "reason"),
    [
        (clips.corrupt, CorruptVideo, "cannot be read"),
        (lambda: clips.truncated("mp4"), CorruptVideo, "cannot be read"),
        (lambda: clips.truncated("mkv"), CorruptVideo, "truncated|no frame that decodes"),
        (clips.audio_only, UnsupportedVideo, "no video stream.*audio"),
        (clips.unknown_codec, UnsupportedVideo, "codec"),
        (lambda: b"", CorruptVideo, "empty"),
    ],
    ids=["corrupt", "truncated-mp4", "truncated-mkv", "audio-only", "unknown-codec", "empty"],
)
def test_an_unusable_clip_is_an_input_error_that_says_why(make, error, reason):
    with pytest.raises(error, match=reason):
        check_video(make(), ROOMY)


@pytest.mark.parametrize(
    ("bounds", "reason"),
    [
        ({"max_bytes": 2000}, "bytes"),
        ({"max_duration_s": 1.0}, "lasts 2.00 s"),
        ({"max_frames": 10}, "16 frames"),
        ({"max_pixels": 64 * 48 - 1}, "64x48 pixels"),
    ],
)
def test_each_bound_is_checked_from_the_header_before_any_frame_is_decoded(bounds, reason, monkeypatch):
    data = clips.still(16)  # 2 s at 8 fps, 64 x 48
    monkeypatch.setattr("domain.videos.decode_frames", lambda *a, **k: pytest.fail("decoded past a header check"))
    with pytest.raises(PayloadTooLarge, match=reason):
        check_video(data, limits(**bounds))


def test_a_header_that_lies_about_the_length_is_caught_while_decoding():
    data = clips.lying_duration(24)  # 3 s of frames; its header says 0.1 s
    info = probe_video(data, limits(max_duration_s=1.0, max_frames=10))  # the header passes both bounds
    assert info.duration_s == pytest.approx(0.1)
    with pytest.raises(PayloadTooLarge, match="more than 10 frames"):
        check_video(data, limits(max_duration_s=100, max_frames=10))
    with pytest.raises(PayloadTooLarge, match="runs past 1 s"):
        check_video(data, limits(max_duration_s=1.0))


def test_frames_are_taken_by_stride_or_by_rate():
    data = clips.still(16)  # 8 fps
    assert check_video(data, ROOMY).sampled == tuple(range(16))
    assert check_video(data, ROOMY, stride=3).sampled == (0, 3, 6, 9, 12, 15)
    assert check_video(data, ROOMY, fps=2).sampled == (0, 4, 8, 12)
    assert check_video(data, ROOMY, fps=2).frames == 16


def test_the_sampler_by_rate_takes_one_frame_per_slot_of_a_variable_rate_clip():
    sampler = FrameSampler(fps=1)
    times = [0.0, 0.3, 0.9, 1.05, 1.1, 2.5, 2.6, 4.0]
    assert [i for i, t in enumerate(times) if sampler.take(i, t)] == [0, 3, 5, 7]
