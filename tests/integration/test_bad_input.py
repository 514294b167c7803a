"""Bad input gets a clear 4xx problem, never a 5xx; nothing is queued; the worker keeps going."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.conftest import image_bytes
from tests.integration.helpers import run_to_end, submit


def png_claiming(width: int, height: int) -> bytes:
    """A tiny real PNG whose header claims ``width x height``: a decompression bomb's header."""
    raw = Image.new("1", (8, 8)).tobytes()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    body = zlib.compress(b"\x00" + raw[:1] * 1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def encoded(mode: str, fmt: str, size=(64, 48), **save) -> bytes:
    array = np.random.default_rng(0).integers(
        0, 255, (size[1], size[0], len(mode) if mode in ("RGB", "RGBA", "CMYK") else 1)
    )
    image = (
        Image.fromarray(array.squeeze().astype(np.uint8)).convert(mode)
        if mode not in ("I;16",)
        else Image.fromarray((array.squeeze() * 257).astype(np.uint16))
    )
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def assert_problem(answer, status: int, field: str | None = None):
    assert answer.status_code == status, answer.get_data(as_text=True)
    assert answer.mimetype == "application/problem+json"
    body = answer.get_json()
    assert body["status"] == status and body["title"] and body["detail"]
    if field:
        assert field in [e["field"] for e in body.get("errors", [])], body
    return body


@pytest.fixture(scope="module")
def jpeg():
    return image_bytes("en.jpg")


@pytest.mark.parametrize(
    ("name", "make", "status"),
    [
        ("zero bytes", lambda j: b"", 400),
        ("truncated jpeg", lambda j: j[: len(j) // 2], 400),
        ("corrupt jpeg", lambda j: j[:20] + bytes(range(256)) * 40, 400),
        ("plain text", lambda j: b"hello, I am not an image", 415),
        ("a pdf", lambda j: b"%PDF-1.4\n" + b"0" * 100, 415),
        ("a gif", lambda j: encoded("P", "GIF"), 415),
        ("decompression bomb header", lambda j: png_claiming(50_000, 50_000), 413),
        ("png with a broken chunk", lambda j: png_claiming(100, 100)[:40], 400),
        ("more bytes than allowed", lambda j: b"\xff\xd8\xff" + b"\0" * (21 * 1024 * 1024), 413),
    ],
)
def test_a_bad_image_is_refused_with_its_status_and_nothing_is_queued(client, redis_client, jpeg, name, make, status):
    answer = submit(client, make(jpeg), {"prompts": {"text": ["x"]}}, filename="photo.jpg")
    assert_problem(answer, status)
    assert not list(redis_client.scan_iter(match="maskq:job:*"))
    assert sum(redis_client.llen(lane) for lane in ("interactive", "default", "batch")) == 0


@pytest.mark.parametrize(
    ("request_json", "field"),
    [
        ({"model": "no-such-model"}, "model"),
        ({"lane": "urgent"}, "lane"),
        ({"prompts": {"mask": {"size": [132, 709], "counts": "0"}}}, "prompts.mask"),
        ({"prompts": {"points": [[5000, 10, 1]]}}, "prompts.points.0"),
        ({"prompts": {"points": [[10, 10, 7]]}}, "prompts.points.0.2"),
        ({"prompts": {"boxes": [[10, 10, 5, 5]]}}, "prompts.boxes.0"),
        ({"prompts": {"boxes": [[0, 0, 800, 100]]}}, "prompts.boxes.0"),
        ({"prompts": {"text": ["x"] * 65}}, "prompts"),
        ({"prompts": {"text": [""]}}, "prompts.text.0"),
        ({"outputs": ["jpeg"]}, "outputs.0"),
        ({"deadline_s": -1}, "deadline_s"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_an_invalid_request_is_a_422_that_names_the_field(client, redis_client, jpeg, request_json, field):
    assert_problem(submit(client, jpeg, request_json), 422, field)
    assert not list(redis_client.scan_iter(match="maskq:job:*"))


def test_a_malformed_mask_rle_is_a_422_on_its_counts(client, jpeg):
    from domain.errors import ValidationFailed
    from domain.schemas import check_request, parse_request

    request = parse_request({"prompts": {"mask": {"size": [132, 709], "counts": "zz~~"}}})
    with pytest.raises(ValidationFailed) as caught:
        check_request(request, width=709, height=132, prompt_kinds=frozenset({"mask"}), max_prompts=8, max_text_chars=9)
    assert [e["field"] for e in caught.value.errors] == ["prompts.mask.counts"]


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        ("{not json", "application/json", 400),
        ('["a list"]', "application/json", 400),
        ('{"image": {"base64": "@@@not base64@@@"}}', "application/json", 400),
        ('{"prompts": {}}', "application/json", 400),
        ("image=1", "application/x-www-form-urlencoded", 415),
    ],
)
def test_a_malformed_body_is_a_4xx_problem(client, body, content_type, status):
    assert_problem(client.post("/v1/jobs", data=body, content_type=content_type), status)


def test_a_request_part_that_is_not_json_is_a_400(client, jpeg):
    answer = client.post(
        "/v1/jobs", data={"image": (io.BytesIO(jpeg), "a.jpg"), "request": "{oops"}, content_type="multipart/form-data"
    )
    assert_problem(answer, 400, "request")


def test_a_multipart_body_without_an_image_is_a_400(client):
    answer = client.post("/v1/jobs", data={"request": "{}"}, content_type="multipart/form-data")
    assert_problem(answer, 400, "image")


def test_a_body_over_the_request_limit_is_refused_while_reading(client):
    big = b"\xff\xd8\xff" + b"\0" * (40 * 1024 * 1024)
    answer = submit(client, big)
    assert_problem(answer, 413)


def test_a_bad_wait_value_is_a_400(client):
    assert_problem(client.get("/v1/jobs/" + "0" * 32 + "?wait=999"), 400, "wait")


def test_unknown_routes_and_methods_are_problems_too(client):
    assert_problem(client.get("/v1/nothing"), 404)
    assert_problem(client.put("/v1/jobs"), 405)


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("palette png", lambda: encoded("P", "PNG")),
        ("greyscale png", lambda: encoded("L", "PNG")),
        ("grey with alpha", lambda: encoded("LA", "PNG")),
        ("rgba png", lambda: encoded("RGBA", "PNG")),
        ("16-bit png", lambda: encoded("I;16", "PNG")),
        ("cmyk jpeg", lambda: encoded("CMYK", "JPEG")),
        ("webp", lambda: encoded("RGB", "WEBP")),
        ("bmp", lambda: encoded("RGB", "BMP")),
        ("tiff", lambda: encoded("RGB", "TIFF")),
    ],
)
def test_every_supported_format_and_mode_runs_to_success(client, name, data):
    job = run_to_end(client, data(), filename="misnamed.txt")
    assert job["status"] == "succeeded", job
    assert (job["result"]["width"], job["result"]["height"]) == (64, 48)


@pytest.mark.usefixtures("worker")
def test_after_every_kind_of_bad_input_the_worker_still_runs_jobs(client, jpeg, worker):
    for bad in (b"", jpeg[:100], b"GIF89a", png_claiming(90_000, 90_000)):
        assert submit(client, bad).status_code < 500
    assert worker.alive
    assert run_to_end(client, jpeg)["status"] == "succeeded"


def test_a_job_whose_stored_input_is_undecodable_fails_with_code_input_and_the_worker_lives(app, client, worker):
    """The worker decodes the stored input again; one that cannot be decoded fails the job, not the worker."""
    from domain.records import JobRecord
    from webapp.services import services

    with app.app_context():
        s = services()
        record = JobRecord(
            id="e" * 32,
            tenant="default",
            lane="default",
            model="text-regions",
            input_key="tenants/default/jobs/" + "e" * 32 + "/input.jpg",
            image_sha256="",
            width=9,
            height=9,
        )
        s.storage.put(record.input_key, b"\xff\xd8\xff broken")
        s.jobs.create(record)
        s.celery.send_task("maskq.run_job", args=[record.id], queue="default", task_id=record.id)
    final = client.get(f"/v1/jobs/{record.id}?wait=30").get_json()
    assert final["status"] == "failed"
    assert final["error"]["code"] == "input"
    assert worker.alive
    assert run_to_end(client, image_bytes("en.jpg"))["status"] == "succeeded"


def test_a_request_sent_as_a_file_part_is_read_like_a_form_field(client, jpeg):
    request = json.dumps({"lane": "batch", "outputs": ["rle", "png"]}).encode()
    answer = client.post(
        "/v1/jobs",
        data={"image": (io.BytesIO(jpeg), "a.jpg"), "request": (io.BytesIO(request), "req.json")},
        content_type="multipart/form-data",
    )
    assert answer.status_code == 202, answer.get_json()
    assert answer.get_json()["lane"] == "batch"  # not silently the default lane
    broken = client.post(
        "/v1/jobs",
        data={"image": (io.BytesIO(jpeg), "a.jpg"), "request": (io.BytesIO(b"{oops"), "req.json")},
        content_type="multipart/form-data",
    )
    assert_problem(broken, 400, "request")


def test_a_megabyte_of_mask_counts_is_a_prompt_422_in_the_requests_words(client, jpeg):
    request = {"prompts": {"mask": {"size": [132, 709], "counts": "P" * 400_000}}}
    answer = submit(client, image_bytes("en.jpg"), request)
    assert answer.status_code == 422
    body = answer.get_json()
    [counts] = [e["message"] for e in body["errors"] if e["field"] == "prompts.mask.counts"]
    assert "longer than the whole" in counts and "digits" not in body["detail"]


def test_a_jobs_files_are_served_and_any_other_name_is_a_404_never_a_500(client, worker):
    job = run_to_end(client, image_bytes("ch_en_num.jpg"), {"outputs": ["rle", "png"]})
    assert job["status"] == "succeeded" and job["result"]["instances"]
    base = f"/v1/jobs/{job['id']}/files/"
    png = client.get(base + "masks/0.png")
    assert png.status_code == 200 and png.mimetype == "image/png" and png.data.startswith(b"\x89PNG")
    assert client.get(base + "input.jpg").status_code == 200
    for name in (
        "masks/%00.png",
        "masks/0.png%00",
        "%00",
        "masks/../input.jpg",
        "masks/x.png",
        "result.json",
        "masks/99.png",
        "..%2f..%2fetc%2fpasswd",
    ):
        answer = client.get(base + name)
        assert answer.status_code == 404 and answer.mimetype == "application/problem+json", (name, answer.status_code)


@pytest.mark.parametrize("as_body", [False, True])
def test_json_nested_far_too_deeply_is_a_400_not_a_500(client, jpeg, as_body):
    nested = "[" * 200_000 + "]" * 200_000
    if as_body:
        answer = client.post("/v1/jobs", data=nested, content_type="application/json")
        assert_problem(answer, 400, "body")
    else:
        answer = client.post(
            "/v1/jobs",
            data={"image": (io.BytesIO(jpeg), "a.jpg"), "request": nested},
            content_type="multipart/form-data",
        )
        assert_problem(answer, 400, "request")
