"""``maskq segment FOLDER``: a data team's batch run against a real web server and worker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import IMAGES, ROOT, VENV_BIN, require


def run_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "maskq"), *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_folder_becomes_coco_json_with_bad_files_reported_and_a_rerun_submits_nothing_twice(
    web, base_env, redis_client, tmp_path
):
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

    first = run_cli(
        env, "segment", str(folder), "--out", str(tmp_path / "coco.json"), "--text", "dataset", "--text", "促销"
    )
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

    again = run_cli(
        env, "segment", str(folder), "--out", str(tmp_path / "again.json"), "--text", "dataset", "--text", "促销"
    )
    assert again.returncode == 1
    rerun = json.loads((tmp_path / "again.json").read_text())
    assert [i["maskq_job_id"] for i in rerun["images"]] == [i["maskq_job_id"] for i in coco["images"]]
    assert len(list(redis_client.scan_iter(match="maskq:job:*"))) == jobs_before


def folder_of_test_images(tmp_path) -> Path:
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(IMAGES / "en.jpg", folder / "en.jpg")
    shutil.copy(IMAGES / "ch_en_num.jpg", folder / "sub" / "promo.jpg")
    return folder


@pytest.mark.parametrize("mode", ["per-image", "server-batch"])
def test_prompts_per_image_and_every_output_format_in_both_modes(mode, web, base_env, tmp_path):
    folder = folder_of_test_images(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"file": "sub/promo.jpg", "text": ["促销"]}\n{"file": "en.jpg", "prompts": {"text": ["dataset"]}}\n'
    )
    key = run_cli(base_env, "keys", "create", "--tenant", f"cli-{mode}").stdout.strip()
    env = {**base_env, "MASKQ_API_URL": web, "MASKQ_API_KEY": key}
    extra = ["--server-batch"] if mode == "server-batch" else []

    lines = run_cli(
        env,
        "segment",
        str(folder),
        "--format",
        "jsonl",
        "--out",
        str(tmp_path / "out.jsonl"),
        "--prompts-file",
        str(prompts),
        "--model",
        "text-regions",
        *extra,
    )
    assert lines.returncode == 0, lines.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["en.jpg", "sub/promo.jpg"]
    labels = {r["file_name"]: " ".join(i["label"] for i in r["job"]["result"]["instances"]) for r in rows}
    assert "Dataset" in labels["en.jpg"] and "促销" in labels["sub/promo.jpg"]  # each image its own prompt
    # Piped: one plain progress line per image (done/total, rate, ETA, failures), no bar.
    progress = [line for line in lines.stderr.splitlines() if line.startswith("[")]
    assert len(progress) == 2 and progress[-1].startswith("[2/2]") and "img/s" in progress[-1], lines.stderr
    assert "\r" not in lines.stderr

    masks = run_cli(
        env,
        "segment",
        str(folder),
        "--format",
        "png",
        "--out",
        str(tmp_path / "masks"),
        "--prompts-file",
        str(prompts),
        "--model",
        "text-regions",
        *extra,
    )
    assert masks.returncode == 0, masks.stderr
    described = json.loads((tmp_path / "masks" / "sub" / "promo" / "instances.json").read_text())
    assert described["instances"] and described["job_id"] == rows[1]["job"]["id"]
    from PIL import Image

    first = described["instances"][0]
    mask = Image.open(tmp_path / "masks" / "sub" / "promo" / first["png"])
    assert mask.size == (rows[1]["job"]["result"]["width"], rows[1]["job"]["result"]["height"])
    assert int((np.asarray(mask) == 255).sum()) == first["area"]


def test_on_a_terminal_the_progress_is_a_bar(web, base_env, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    folder = folder_of_test_images(tmp_path)
    key = run_cli(base_env, "keys", "create", "--tenant", "cli-tty").stdout.strip()
    env = {**os.environ, **base_env, "MASKQ_API_URL": web, "MASKQ_API_KEY": key}
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal 120 wide
    process = subprocess.Popen(
        [
            str(VENV_BIN / "maskq"),
            "segment",
            str(folder),
            "--out",
            str(tmp_path / "c.json"),
            "--text",
            "dataset",
            "--model",
            "text-regions",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=follower,
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        seen += chunk
    assert process.wait(120) == 0
    text = seen.decode(errors="replace")
    assert "2/2" in text and "100%" in text and "failed=0" in text, text  # tqdm's bar, with the failures
    assert "[1/2]" not in text  # not the piped lines
