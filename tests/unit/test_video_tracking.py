"""The pure parts of following objects through a clip: the motion measured in a box, a mask moved by it, the
objects a frame's prompts make; and a video job's progress in its document."""

from __future__ import annotations

import numpy as np
import pytest

from domain.documents import video_progress
from domain.records import JobRecord, JobState
from models.adapters.base import Prompts
from models.video_tracking import grey, grown, mask_box, motion, prompted_objects, shifted
from tests.support import clips


def test_the_motion_in_the_cups_box_is_the_pans_step():
    first, second = (grey(f) for f in clips.pan_frames(2))
    box = grown(clips.CUP, 0.25, *clips.WINDOW)
    dx, dy = motion(first, second, box, min_response=0.1)
    assert dx == pytest.approx(-clips.PAN_STEP, abs=0.5) and dy == pytest.approx(0, abs=0.5)


def test_no_clear_motion_is_no_motion():
    """Two unrelated frames (noise): phase correlation finds no clear peak, and the mask is not moved."""
    rng = np.random.default_rng(0)
    before, after = (rng.random((64, 64)).astype(np.float32) for _ in range(2))
    assert motion(before, after, (0, 0, 64, 64), min_response=0.1) == (0.0, 0.0)


def test_a_mask_moved_keeps_its_shape_and_drops_what_leaves_the_frame():
    mask = np.zeros((20, 30), bool)
    mask[5:10, 2:8] = True
    assert mask_box(shifted(mask, -4, 3)) == (0.0, 8.0, 4.0, 13.0)  # two columns went past the left edge
    assert shifted(mask, 0, 0) is mask
    assert mask_box(np.zeros((4, 4), bool)) is None


def test_each_box_is_an_object_with_its_points_the_points_alone_one_and_a_mask_one():
    mask = np.ones((4, 4), bool)
    objects = prompted_objects(Prompts(points=((1, 1, 1),), boxes=((0, 0, 2, 2), (1, 1, 3, 3)), mask=mask))
    assert [label for label, _ in objects] == ["box:0", "box:1", "mask"]
    assert objects[1][1].boxes == ((1, 1, 3, 3),) and objects[1][1].points == ((1, 1, 1),)
    assert [label for label, _ in prompted_objects(Prompts(points=((1, 1, 1), (2, 2, 0))))] == ["points"]


def record(**fields) -> JobRecord:
    return JobRecord(
        id="a" * 32, tenant="t", lane="default", model="sam", input_key="k", image_sha256="s", width=4, height=4,
        media="video", **fields,
    )  # fmt: skip


def test_a_video_jobs_eta_is_at_the_rate_of_the_run_now_going():
    chunks = [{"frames": 4, "attempt": 1}, {"frames": 4, "attempt": 2}]  # 4 frames before a crash, 4 since
    running = record(status=JobState.RUNNING, started_at=100.0, attempts=2, frames_total=20, frames_done=8)
    running.chunks = chunks
    assert video_progress(running, now=110.0) == {"frames_done": 8, "frames_total": 20, "eta_s": 30.0}
    queued = record(frames_total=20, frames_done=0)
    assert video_progress(queued) == {"frames_done": 0, "frames_total": 20, "eta_s": None}
