"""The core job path through the API: a real worker process runs the real model on real images."""

from __future__ import annotations

import io
import time

import pytest

from tests.conftest import image_bytes
from tests.integration.helpers import decode, run_to_end, small_png, submit

pytestmark = pytest.mark.usefixtures("worker")


def labels(job):
    return [i["label"] for i in job["result"]["instances"]]


def test_a_text_prompt_finds_the_chinese_price_tag_text_with_a_valid_mask(client):
    job = run_to_end(client, image_bytes("ch_en_num.jpg"), {"prompts": {"text": ["促销"]}})
    assert job["status"] == "succeeded", job
    instances = job["result"]["instances"]
    assert instances and all("促销" in i["label"] for i in instances)
    assert (job["result"]["width"], job["result"]["height"]) == (323, 430)
    for instance in instances:
        mask = decode(instance["mask"])
        assert mask.shape == (430, 323)
        assert mask.sum() == instance["area"] > 0
        x, y, w, h = instance["bbox"]
        ys, xs = mask.nonzero()
        assert xs.min() >= x and xs.max() < x + w and ys.min() >= y and ys.max() < y + h


def test_a_text_prompt_matches_whatever_the_case(client):
    job = run_to_end(client, image_bytes("en.jpg"), {"prompts": {"text": ["dataset"]}})
    assert job["status"] == "succeeded"
    assert any("Dataset" in label for label in labels(job))


def test_exif_orientation_is_applied_before_reading_and_boxes_are_upright(client):
    job = run_to_end(client, image_bytes("img_exif_orientation.jpg"), {"prompts": {"text": ["中国"]}})
    assert job["status"] == "succeeded"
    result = job["result"]
    assert any("中国" in label for label in labels(job))
    # Orientation 3 is a half turn: the upright image keeps the stored width and height.
    assert (result["width"], result["height"]) == (752, 306)
    for instance in result["instances"]:
        x, y, w, h = instance["bbox"]
        assert x >= 0 and x + w <= 752 and y >= 0 and y + h <= 306
        assert w > h  # one upright line of text is wider than tall


def test_an_all_black_image_succeeds_with_no_instances(client):
    job = run_to_end(client, image_bytes("empty_black.jpg"))
    assert job["status"] == "succeeded"
    assert job["result"]["instances"] == []


def test_a_point_selects_exactly_the_region_under_it_and_a_box_selects_it_alone(client):
    image = image_bytes("ch_en_num.jpg")
    everything = run_to_end(client, image)["result"]["instances"]
    assert len(everything) >= 3
    target = everything[1]
    mask = decode(target["mask"])
    ys, xs = mask.nonzero()
    inside = (int(xs[len(xs) // 2]), int(ys[len(ys) // 2]))
    assert mask[inside[1], inside[0]]

    by_point = run_to_end(client, image, {"prompts": {"points": [[inside[0], inside[1], 1]]}})["result"]["instances"]
    assert [i["label"] for i in by_point] == [target["label"]]
    assert by_point[0]["mask"] == target["mask"]

    x, y, w, h = target["bbox"]
    box = [max(x - 2, 0), max(y - 2, 0), min(x + w + 2, 323), min(y + h + 2, 430)]
    by_box = run_to_end(client, image, {"prompts": {"boxes": [box]}})["result"]["instances"]
    assert target["mask"] in [i["mask"] for i in by_box]
    for instance in by_box:
        bx, by, bw, bh = instance["bbox"]
        # Nothing mostly outside the box comes back.
        overlap_w = max(0, min(bx + bw, box[2]) - max(bx, box[0]))
        overlap_h = max(0, min(by + bh, box[3]) - max(by, box[1]))
        assert overlap_w * overlap_h >= 0.5 * bw * bh


def test_png_masks_and_polygons_are_returned_when_asked(client):
    job = run_to_end(client, image_bytes("en.jpg"), {"prompts": {"text": ["Dataset"]}, "outputs": ["png", "polygon"]})
    instance = job["result"]["instances"][0]
    assert "mask" not in instance
    assert len(instance["polygon"][0]) >= 6
    png = client.get(instance["png_url"].replace("http://localhost", ""))
    assert png.status_code == 200 and png.data.startswith(b"\x89PNG")


def test_the_json_form_with_an_inline_base64_image_runs_too(client):
    import base64

    body = {"image": {"base64": base64.b64encode(image_bytes("en.jpg")).decode()}, "prompts": {"text": ["MovieShots"]}}
    answer = client.post("/v1/jobs", json=body)
    assert answer.status_code == 202
    assert answer.headers["Location"] == f"/v1/jobs/{answer.get_json()['id']}"
    job = client.get(f"{answer.headers['Location']}?wait=30").get_json()
    assert job["status"] == "succeeded"
    assert any("movieshots" in label.lower().replace(" ", "") for label in labels(job))


def test_a_job_record_tells_its_model_version_and_timestamps(client):
    job = run_to_end(client, image_bytes("en.jpg"))
    assert job["model"]["name"] == "text-regions" and job["model"]["version"]
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]


def test_an_unknown_job_id_is_a_404_problem(client):
    for job_id in ("0" * 32, "not-an-id"):
        answer = client.get(f"/v1/jobs/{job_id}")
        assert answer.status_code == 404
        assert answer.mimetype == "application/problem+json"


def test_a_long_poll_returns_as_soon_as_the_job_ends(client):
    job = submit(client, image_bytes("en.jpg")).get_json()
    started = time.monotonic()
    answer = client.get(f"/v1/jobs/{job['id']}?wait=20").get_json()
    waited = time.monotonic() - started
    assert answer["status"] == "succeeded"
    assert waited < 10  # far below the 20 s asked: it returned on the end, not the timeout


def test_a_long_poll_on_a_job_that_cannot_start_returns_at_its_timeout(client, redis_client):
    from domain.records import JobRecord

    record = JobRecord(
        id="f" * 32,
        tenant="default",
        lane="batch",
        model="text-regions",
        input_key="x",
        image_sha256="",
        width=1,
        height=1,
    )
    from webapp.services import services

    with client.application.app_context():
        services().jobs.create(record)
    started = time.monotonic()
    answer = client.get(f"/v1/jobs/{record.id}?wait=1")
    assert answer.get_json()["status"] == "queued"
    assert 0.9 <= time.monotonic() - started < 5


def test_models_and_readiness_show_the_loaded_worker(client):
    models = client.get("/v1/models").get_json()["models"]
    assert [m["name"] for m in models] == ["text-regions"]
    assert models[0]["loaded"] is True and models[0]["prompt_kinds"] == ["boxes", "points", "text"]
    # Where the live worker runs it: this machine has no GPU, so ONNX Runtime's CPU provider, on "cpu".
    assert models[0]["providers"] == ["CPUExecutionProvider"] and models[0]["devices"] == ["cpu"]
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"]["redis"] == "ok"
    assert client.get("/healthz").status_code == 200
    assert b"maskq_lane_depth" in client.get("/metrics").data


def test_one_key_cannot_hold_every_web_thread_with_long_polls(isolated):
    import threading

    client = isolated.client(max_waits_per_key=2)
    job_id = submit(client, small_png()).get_json()["id"]  # no worker: it stays queued
    app = client.application
    started = threading.Barrier(3)
    answers = []

    def long_poll() -> None:
        poller = app.test_client()
        poller.environ_base = dict(client.environ_base)  # the same key
        started.wait()
        answers.append(poller.get(f"/v1/jobs/{job_id}?wait=4").status_code)

    threads = [threading.Thread(target=long_poll) for _ in range(2)]
    for thread in threads:
        thread.start()
    started.wait()
    time.sleep(0.5)  # both are waiting now
    third = client.get(f"/v1/jobs/{job_id}?wait=4")
    assert third.status_code == 429 and int(third.headers["Retry-After"]) >= 1
    assert "MASKQ_MAX_WAITS_PER_KEY" in third.get_json()["detail"]
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # polling without wait still answers
    assert app.test_client().get("/healthz").status_code == 200
    prefer = client.post(
        "/v1/jobs",
        data={"image": (io.BytesIO(small_png(2)), "a.png")},
        content_type="multipart/form-data",
        headers={"Prefer": "wait=4"},
    )
    assert prefer.status_code == 202 and "Preference-Applied" not in prefer.headers  # answered at once
    for thread in threads:
        thread.join()
    assert answers == [200, 200]
    assert client.get(f"/v1/jobs/{job_id}?wait=0.2").status_code == 200  # the slots are free again


def test_the_public_probe_says_ready_or_not_and_only_an_admin_key_reads_the_internals(app, client, worker):
    ready = client.application.test_client().get("/readyz")  # no key needed
    body = ready.get_json()
    assert ready.status_code == 200 and body["status"] == "ready"
    assert set(body) == {"status", "checks"} and body["checks"]["redis"] == "ok"
    assert "pid" not in ready.get_data(as_text=True) and "onnx" not in ready.get_data(as_text=True)
    assert client.get("/v1/admin/status").status_code == 403  # a tenant's key
    from stores.tenants import KeyStore
    from webapp.services import services

    with app.app_context():
        key, _ = KeyStore(services().redis).create("ops", admin=True)
    status = client.get("/v1/admin/status", headers={"Authorization": f"Bearer {key}"})
    assert status.status_code == 200
    detail = status.get_json()
    assert detail["workers"] and all("models" in w and "id" in w for w in detail["workers"])
    assert detail["gates"] and detail["checks"]["redis"] == "ok"
