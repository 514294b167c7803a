"""``maskq segment FOLDER``: a data team's batch run against a real web server and worker."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import requests

from tests.conftest import IMAGES, ROOT, VENV_BIN, free_port, require


def run_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "maskq"), *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_a_folder_becomes_coco_json_with_bad_files_reported_and_a_rerun_submits_nothing_twice(
        web, base_env, redis_client, tmp_path):
    require((IMAGES / "en.jpg").is_file(), "the test images in tests/data/")
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ("en.jpg", "ch_en_num.jpg"):
        shutil.copy(IMAGES / name, folder / name)
    shutil.copy(IMAGES / "empty_black.jpg", folder / "sub" / "black.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (folder / "notes.txt").write_text("not an image: ignored")
    key = run_cli(base_env, "keys", "create", "--tenant", "datateam").stdout.strip()
    env = {**base_env, "MASKQ_API_URL": web, "MASKQ_API_KEY": key}

    first = run_cli(env, "segment", str(folder), "--out", str(tmp_path / "coco.json"), "--text", "dataset",
                    "--text", "促销")
    assert first.returncode == 1, first.stderr  # one file failed, so the exit code says so
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == ["ch_en_num.jpg", "en.jpg", "sub/black.jpg"]
    assert [f["file_name"] for f in coco["failures"]] == ["broken.jpg"]
    assert coco["failures"][0]["error"].startswith("400")
    labels = {a["label"] for a in coco["annotations"]}
    assert any("Dataset" in label for label in labels) and any("促销" in label for label in labels)
    from pycocotools import mask as mask_utils

    for annotation in coco["annotations"]:
        rle = dict(annotation["segmentation"], counts=annotation["segmentation"]["counts"].encode())
        assert int(mask_utils.area(rle)) == annotation["area"]
    jobs_before = len(list(redis_client.scan_iter(match="maskq:job:*")))

    again = run_cli(env, "segment", str(folder), "--out", str(tmp_path / "again.json"), "--text", "dataset",
                    "--text", "促销")
    assert again.returncode == 1
    rerun = json.loads((tmp_path / "again.json").read_text())
    assert [i["maskq_job_id"] for i in rerun["images"]] == [i["maskq_job_id"] for i in coco["images"]]
    assert len(list(redis_client.scan_iter(match="maskq:job:*"))) == jobs_before
