"""A folder the export tool cannot use is one line on stderr and exit status 2: never a traceback.

``tools/export_sam.py`` on folders that are not a checkpoint (no ``config.json``, another model's,
unreadable JSON), on checkpoints whose weights were cut short (an interrupted download), and on
SAM 3 folders whose tokenizer is missing or broken. Each line must name the folder (or its file)
and what is wrong with it, and the tool must leave no output folder behind to be mistaken for an
export. One case runs the tool as a process, as a user runs it (its whole stderr is the one line);
the others call its ``main()`` here, which saves a torch import per case (seconds each).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.integration.sam3_fixtures import require_sam_extra


@pytest.fixture
def export(capsys):
    """``export(checkpoint, out_dir)``: the tool's ``main()`` in this process, as a finished process."""
    from tools.export_sam import main

    def run(checkpoint: Path, out_dir: Path) -> subprocess.CompletedProcess:
        capsys.readouterr()
        status = main([str(checkpoint), str(out_dir)])  # an exception here fails the test: no traceback allowed
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["export_sam.py"], status, out, err)

    return run


def assert_one_clear_line(done: subprocess.CompletedProcess, folder: Path, *problem: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    [line] = lines
    assert line.startswith(f"export_sam: {folder}"), line  # the folder (or its file) first
    for words in problem:
        assert words in line, line
    assert done.stdout == ""  # no manifest entry printed


def cut_in_half(path: Path) -> None:
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size // 2)


@pytest.fixture(scope="module", autouse=True)
def sam_extra():
    require_sam_extra()


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        (None, ("no config.json", "not a transformers checkpoint folder")),
        ('{"model_type": "bert"}', ("config.json", "model_type 'bert' is not a SAM family", "supported: sam,")),
        ('{"model_type": "sam3",', ("config.json", "not readable JSON")),
    ],
    ids=["no-config", "another-model", "bad-json"],
)
def test_a_folder_that_is_not_a_sam_checkpoint_is_one_line_and_status_2(export, tmp_path, config, problem):
    folder = tmp_path / "download"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    if config is not None:
        (folder / "config.json").write_text(config)
    done = export(folder, tmp_path / "out")
    assert_one_clear_line(done, folder, *problem)
    assert not (tmp_path / "out").exists()


def test_a_sam_checkpoint_whose_weights_are_cut_in_half_is_one_line_and_status_2(export, tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "sam-vit-base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "sam"}))
    save_file({"vision_encoder.neck.conv1.weight": np.zeros((256, 256), np.float32)}, folder / "model.safetensors")
    cut_in_half(folder / "model.safetensors")
    done = export(folder, tmp_path / "out")
    assert_one_clear_line(done, folder, "the weights could not be read", "SafetensorError")


def test_the_tool_run_on_a_sam3_checkpoint_whose_weights_are_cut_in_half_prints_one_line_and_exits_2(
    tiny_sam3, tmp_path
):
    folder = tmp_path / "sam3"
    shutil.copytree(tiny_sam3.checkpoint, folder)
    cut_in_half(folder / "model.safetensors")
    done = subprocess.run(
        [sys.executable, "tools/export_sam.py", str(folder), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_clear_line(done, folder, "the weights could not be read", "SafetensorError")
    assert not (tmp_path / "out").exists()


def test_a_sam3_checkpoint_without_its_tokenizer_is_one_line_and_status_2(export, tiny_sam3, tmp_path):
    folder = tmp_path / "sam3"
    shutil.copytree(tiny_sam3.checkpoint, folder)
    (folder / "tokenizer.json").unlink()
    done = export(folder, tmp_path / "out")
    assert_one_clear_line(done, folder, "SAM 3 needs its tokenizer", "missing tokenizer.json")


def test_a_sam3_checkpoint_whose_tokenizer_is_not_json_is_blamed_on_the_tokenizer_not_the_weights(
    export, tiny_sam3, tmp_path
):
    folder = tmp_path / "sam3"
    shutil.copytree(tiny_sam3.checkpoint, folder)
    (folder / "tokenizer.json").write_text("<html>rate limited</html>")
    done = export(folder, tmp_path / "out")
    assert_one_clear_line(done, folder, "the tokenizer (tokenizer.json", "could not be read")
    assert "weights" not in done.stderr
