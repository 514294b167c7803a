"""The result writer is chosen by the job's media; an instance's object id and frame reach its result item."""

from __future__ import annotations

import json

import numpy as np
import pytest

from domain import masks
from domain.keys import job_prefix
from domain.records import JobRecord
from domain.schemas import parse_request
from models.adapters.base import Instance
from storage.local import LocalStorage
from workers import pipeline, results
from workers.results import ImageResultWriter, UnknownMedia


def record(media: str = "image", **request) -> JobRecord:
    return JobRecord(
        id="r" * 32,
        tenant="t",
        lane="default",
        model="m",
        input_key="t/in.png",
        image_sha256="",
        width=6,
        height=4,
        request=parse_request(request),
        media=media,
    )


def square(x0: int, y0: int, side: int) -> np.ndarray:
    mask = np.zeros((4, 6), bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return mask


def written(storage: LocalStorage, key: str) -> dict:
    return json.loads(storage.get(key))


def test_the_writer_is_picked_by_the_jobs_media():
    assert isinstance(results.writer_for("image"), ImageResultWriter)
    assert results.writer_for(record().media) is results.WRITERS["image"]


def test_a_media_with_no_writer_is_a_clear_error(tmp_path):
    with pytest.raises(UnknownMedia, match=r"no result writer for media 'video'.*writes results for image"):
        results.writer_for("video")
    storage = LocalStorage(tmp_path)
    with pytest.raises(UnknownMedia, match="'hologram'"):
        pipeline.store_result(
            record("hologram"),
            record().request,
            np.zeros((4, 6, 3), np.uint8),
            [Instance(mask=square(0, 0, 2), score=1.0)],
            storage,
        )
    assert list(storage.list("tenants/")) == []  # nothing written in the wrong shape


def test_an_image_result_is_written_as_before(tmp_path):
    storage = LocalStorage(tmp_path)
    job = record(outputs=["rle", "png"])
    key = pipeline.store_result(
        job,
        job.request,
        np.zeros((4, 6, 3), np.uint8),
        [Instance(mask=square(1, 1, 2), score=0.98765, label="cup")],
        storage,
        {"embedding": {"cached": False, "source": None}},
    )
    rle = masks.encode(square(1, 1, 2))
    prefix = job_prefix("t", "r" * 32)
    assert key == f"{prefix}result.json" and storage.get(f"{prefix}masks/0.png") == masks.to_png(square(1, 1, 2))
    want = {
        "width": 6,
        "height": 4,
        "instances": [
            {
                "bbox": [1.0, 1.0, 2.0, 2.0],
                "area": 4,
                "score": 0.9877,
                "label": "cup",
                "mask": rle,
                "png_key": f"{prefix}masks/0.png",
            }
        ],
        "embedding": {"cached": False, "source": None},
    }
    assert storage.get(key) == json.dumps(want).encode()  # the exact bytes: no object_id, no frame


def test_an_instance_with_an_object_id_and_a_frame_writes_them(tmp_path):
    storage = LocalStorage(tmp_path)
    job = record(outputs=["rle"])
    tracked = Instance(mask=square(0, 0, 2), score=0.5, label="ball", object_id=7, frame=3)
    only_object = Instance(mask=square(3, 1, 3), score=0.25, label="cup", object_id=2)
    plain = Instance(mask=square(4, 0, 1), score=1.0)
    key = results.writer_for("image").write(
        job, job.request, np.zeros((4, 6, 3), np.uint8), [tracked, only_object, plain], storage
    )
    first, second, third = written(storage, key)["instances"]
    assert (first["object_id"], first["frame"]) == (7, 3)
    assert list(first) == ["bbox", "area", "score", "label", "object_id", "frame", "mask"]
    assert second["object_id"] == 2 and "frame" not in second
    assert "object_id" not in third and "frame" not in third


def test_a_run_that_no_longer_holds_its_job_writes_nothing(tmp_path):
    storage = LocalStorage(tmp_path)
    job = record(outputs=["rle", "png"])
    asked = []
    with pytest.raises(pipeline.RunStopped, match="no longer this run's"):
        pipeline.store_result(
            job,
            job.request,
            np.zeros((4, 6, 3), np.uint8),
            [Instance(mask=square(1, 1, 2), score=0.9)],
            storage,
            holds=lambda: asked.append(1) or False,
        )
    assert asked == [1] and list(storage.list("")) == []
    key = pipeline.store_result(
        job,
        job.request,
        np.zeros((4, 6, 3), np.uint8),
        [Instance(mask=square(1, 1, 2), score=0.9)],
        storage,
        holds=lambda: True,
    )
    assert storage.get(key)
