"""One script for the first minutes on a GPU machine: ``python -m bench.device_check``
(or ``python -m bench --device``).

It prints one table:

- **environment**: the onnxruntime build and its providers, the GPUs NVML lists,
  ``CUDA_VISIBLE_DEVICES``, and where a worker would run (``workers/devices.py``);
- **each model** (those of the manifest whose files are here) on CPU fp32, CUDA
  fp32, CUDA fp16 (the manifest's ``_fp16`` files, made with
  ``tools/make_fp16.py`` when missing and ``onnx`` is installed), TensorRT fp32
  and fp16 (engines cached under ``var/trt``, so a second run shows the cached
  start): set-up seconds, median seconds per request, speed against CPU fp32,
  and the masks' IoU against CPU fp32 (the union of a request's masks);
- **SAM 3**, when the manifest serves it (any model on
  ``models.adapters.sam3:Sam3Adapter``; its requests are phrases, and a phrase
  with exemplar boxes, with both encoder caches off so each runs every part),
  or else, where the export tool's extra is installed, the tiny random SAM 3
  exported to a temporary folder (``sam3-tiny``: it proves the parts run on the
  GPU providers, not what facebook/sam3 costs): the rows above, and a table of
  each ONNX part alone per variant (``bench/sam3_parts.py``), with the
  providers its session really runs on;
- **the gate's reading**: the GPU memory NVML saw a model's set-up and its
  busiest request take, against the ``memory_mb`` the gate waits for;
- **out of memory**: a CUDA session capped just above its set-up
  (``gpu_mem_limit``), run until it fails, and whether the worker would call
  that failure "out of memory" (and so put the job back on its lane);
- **service efficiency on the GPU**: ``python -m bench --only
  service_efficiency`` with ``MASKQ_DEVICE=cuda`` (skipped with ``--quick``).

On a machine without an NVIDIA GPU (or without onnxruntime-gpu) it says what it
would need and exits 0; ``--cpu-only`` runs the CPU rows anyway (what the tests
do, so this script cannot rot unseen between GPU sessions).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import sam3_parts
from bench.common import ROOT, format_table
from config.settings import load_settings
from domain.images import decode_image
from models.adapters.base import AdapterContext, ModelSpec, Prompts, RuntimeOptions, SegmentRequest
from models.catalog import ModelCatalog
from models.fetch import verify_files
from models.manifest import import_adapter
from tools.onnxruntime_build import installed_builds
from workers.devices import CPU, CUDA, TENSORRT, nvml_devices, placement_here
from workers.job_end import out_of_memory

PHOTOS = ROOT / "tests" / "data" / "photos"
IMAGES = ROOT / "tests" / "data" / "images"
# Requests per model: (image file, prompts). Points on the photos' objects (tests/data/README.md).
WORKLOADS = {
    "sam": [
        (PHOTOS / "coffee.png", Prompts(points=((365, 285, 1),))),
        (PHOTOS / "coins.png", Prompts(points=((50, 50, 1),))),
        (PHOTOS / "rocket.jpg", Prompts(boxes=((295, 115, 350, 415),))),
    ],
    "text-regions": [(p, Prompts()) for p in sorted(IMAGES.iterdir())[:3]] if IMAGES.is_dir() else [],
}
SAM3_ADAPTER = "models.adapters.sam3:Sam3Adapter"
# Any model on SAM 3's adapter, whatever its name: phrases, and a phrase with a positive and a negative exemplar.
SAM3_WORKLOAD = [
    (PHOTOS / "coffee.png", Prompts(text=("cup",))),
    (PHOTOS / "coins.png", Prompts(text=("coin",))),
    (PHOTOS / "rocket.jpg", Prompts(text=("rocket",))),
    (PHOTOS / "coffee.png", Prompts(text=("cup",), exemplars=sam3_parts.EXEMPLARS)),
]
NEEDS = (
    "an NVIDIA GPU with its driver (NVML), and onnxruntime-gpu: `MASKQ_DEVICE=cuda make install` "
    "(installs onnxruntime-gpu[cuda,cudnn], CUDA 13 and cuDNN 9 from PyPI); for the TensorRT rows, "
    "the TensorRT libraries too (`pip install tensorrt-cu13`)"
)


@dataclasses.dataclass
class Variant:
    name: str
    provider: str
    fp16_files: bool = False  # the manifest's _fp16 files (CUDA runs half precision from these)
    trt_fp16: bool = False  # TensorRT builds fp16 engines from the fp32 files


def requests_for(spec: ModelSpec) -> list[SegmentRequest]:
    out = []
    for path, prompts in SAM3_WORKLOAD if spec.adapter == SAM3_ADAPTER else WORKLOADS.get(spec.name, []):
        image = decode_image(path.read_bytes(), max_bytes=10**8, max_pixels=10**8).pixels
        out.append(SegmentRequest(image=image, prompts=prompts))
    return out


def union_mask(instances, shape) -> np.ndarray:
    mask = np.zeros(shape[:2], dtype=bool)
    for instance in instances:
        mask |= instance.mask
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


class GpuWatch:
    """The least free memory NVML reports on one GPU while it runs (polled every 5 ms)."""

    def __init__(self, uuid: str | None):
        self.handle = None
        if uuid:
            import pynvml

            pynvml.nvmlInit()
            self.pynvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)

    def free_mb(self) -> float | None:
        return None if self.handle is None else self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).free / 2**20

    def least_free_during(self, work):
        if self.handle is None:
            return work(), None
        least = [self.free_mb() or 0.0]  # a GPU is watched (handle): a figure, never None
        done = threading.Event()

        def poll():
            while not done.is_set():
                least[0] = min(least[0], self.free_mb() or 0.0)
                time.sleep(0.005)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            result = work()
        finally:
            done.set()
            thread.join()
        return result, least[0]


def tiny_sam3(folder: Path) -> tuple[ModelSpec, Path] | None:
    """The tiny random SAM 3, exported into ``folder``, and its manifest; None without the export tool's extra."""
    if not sam3_parts.can_export():
        return None
    manifest = sam3_parts.export_tiny_sam3(folder)
    return ModelCatalog.load(manifest).spec("sam3-tiny"), manifest


def sam3_part_rows(spec: ModelSpec, variant: Variant, runtime: RuntimeOptions, repeats: int) -> list[dict[str, Any]]:
    """Each ONNX part of SAM 3 alone on ``variant``: median ms and the providers its session runs on."""
    runtime = dataclasses.replace(
        runtime, providers=(variant.provider,), providers_required=True, fp16=variant.trt_fp16
    )
    image = decode_image(sam3_parts.PHOTO.read_bytes(), max_bytes=10**8, max_pixels=10**8).pixels
    timings, providers = sam3_parts.part_timings(spec, runtime, image, max(repeats, 2))
    return [
        {
            "model": spec.name,
            "variant": variant.name,
            "part": part,
            "runs_on": ",".join(providers[part]),
            "median_ms": round(statistics.median(seconds) * 1000, 2),
        }
        for part, seconds in timings.items()
    ]


def fp16_spec(spec: ModelSpec, manifest: Path, models_dir: Path) -> ModelSpec | None:
    """``spec`` on its fp16 files, made with tools/make_fp16.py when missing (None: the model has none)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from make_fp16 import convert, fp16_files  # type: ignore[import-not-found]  # tools/make_fp16.py, on sys.path

    files = dict(spec.files)
    for role, source, target, _ in fp16_files(manifest, spec.name, models_dir):
        if not target.is_file():
            try:
                convert(source, target)
            except ImportError:
                return None  # no onnx here: no fp16 rows
        files[role] = str(target)
    if files == spec.files:
        return None
    return dataclasses.replace(spec, files=files, sha256={}, fp16=True)


def measure(
    spec: ModelSpec,
    variant: Variant,
    runtime: RuntimeOptions,
    requests,
    repeats: int,
    watch: GpuWatch,
    reference: list[np.ndarray] | None,
):
    """Set up ``spec`` on ``variant`` and run ``requests`` ``repeats`` times: one row, and the masks."""
    runtime = dataclasses.replace(
        runtime, providers=(variant.provider,), providers_required=True, fp16=variant.trt_fp16
    )
    before = watch.free_mb()
    started = time.perf_counter()
    adapter = import_adapter(spec.adapter)(spec)
    adapter.setup(AdapterContext(runtime))
    setup_s = time.perf_counter() - started
    after_setup = watch.free_mb()
    masks = [union_mask(adapter.segment([r])[0], r.image.shape) for r in requests]  # warm-up, and the masks
    times = []

    def work():
        for _ in range(repeats):
            for r in requests:
                t = time.perf_counter()
                adapter.segment([r])
                times.append(time.perf_counter() - t)

    _, least_free = watch.least_free_during(work)
    row = {
        "model": spec.name,
        "variant": variant.name,
        "runs_on": ",".join(adapter.execution_providers()),
        "setup_s": round(setup_s, 2),
        "median_s": round(statistics.median(times), 4),
    }
    if reference is not None:
        row["mask_iou_min"] = round(min(iou(a, b) for a, b in zip(masks, reference)), 4)
    if before is not None and after_setup is not None:
        row["setup_mb"] = round(before - after_setup)
        row["busiest_job_mb"] = round(after_setup - least_free) if least_free is not None else ""
        row["gate_need_mb"] = spec.memory_mb
    return row, masks


def forced_out_of_memory(spec: ModelSpec, runtime: RuntimeOptions, requests, setup_mb: float) -> dict:
    """A CUDA session capped a little above its set-up: does its failure read as out of memory?"""
    limit = max(16.0, setup_mb * 1.05)
    runtime = dataclasses.replace(runtime, providers=(CUDA,), providers_required=True, gpu_mem_limit_mb=limit)
    try:
        adapter = import_adapter(spec.adapter)(spec)
        adapter.setup(AdapterContext(runtime))
        for r in requests * 3:
            adapter.segment([r])
    except Exception as exc:  # what a worker would catch around a job
        return {
            "model": spec.name,
            "gpu_mem_limit_mb": round(limit),
            "failed_with": f"{type(exc).__name__}: {exc}"[:90],
            "classified_out_of_memory": out_of_memory(exc),
            "job_would_be": "requeued" if out_of_memory(exc) else "failed",
        }
    return {
        "model": spec.name,
        "gpu_mem_limit_mb": round(limit),
        "failed_with": "nothing: it fit",
        "classified_out_of_memory": "",
        "job_would_be": "run",
    }


def service_efficiency_on_gpu() -> str:
    env = {**os.environ, "MASKQ_DEVICE": "cuda"}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "service_efficiency", "--jobs", "200", "--rounds", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("service_efficiency=")]
    return lines[-1] if lines else f"no figure (exit {done.returncode}): {done.stderr.strip()[-200:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.device_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed passes over each model's requests")
    parser.add_argument("--cpu-only", action="store_true", help="run the CPU rows even without a GPU")
    parser.add_argument("--quick", action="store_true", help="skip the service-efficiency run")
    args = parser.parse_args(argv)

    import onnxruntime

    settings = load_settings()
    gpus = nvml_devices()
    placement = placement_here(settings)
    available = onnxruntime.get_available_providers()
    env_rows = [
        {"what": "onnxruntime", "value": f"{'+'.join(installed_builds())} {onnxruntime.__version__}"},
        {"what": "providers", "value": ", ".join(available)},
        {
            "what": "NVML GPUs",
            "value": "; ".join(f"{g.index}: {g.name} {g.uuid} {g.memory_mb:.0f} MB" for g in gpus) or "none",
        },
        {"what": "CUDA_VISIBLE_DEVICES", "value": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")},
        {"what": "a worker here runs on", "value": f"{placement.describe()['device']} ({placement.reason})"},
    ]
    print(format_table("environment", env_rows))
    on_gpu = bool(gpus) and CUDA in available
    if not on_gpu:
        print(f"\nno GPU to check here: this needs {NEEDS}.")
        if not args.cpu_only:
            return 0

    variants = [Variant("CPU fp32", CPU)]
    if not on_gpu:  # --cpu-only: the fp16 files run on CPU too (slower there: ONNX Runtime casts around most ops)
        variants.append(Variant("CPU fp16", CPU, fp16_files=True))
    if on_gpu:
        variants += [Variant("CUDA fp32", CUDA), Variant("CUDA fp16", CUDA, fp16_files=True)]
        if TENSORRT in available:
            variants += [Variant("TensorRT fp32", TENSORRT), Variant("TensorRT fp16", TENSORRT, trt_fp16=True)]
    from workers.devices import runtime_options

    base = runtime_options(settings, placement)
    watch = GpuWatch(placement.gpu.uuid if on_gpu and placement.gpu else None)
    catalog = ModelCatalog.from_settings(settings)
    specs = [(spec, settings.models_manifest) for spec in catalog.specs.values()]
    scratch = tempfile.TemporaryDirectory(prefix="maskq-device-check-")
    # A SAM 3 of the manifest whose files are here (one not exported on this machine does not count), or the tiny one.
    if not any(
        spec.adapter == SAM3_ADAPTER and all(Path(f).is_file() for f in spec.files.values()) for spec, _ in specs
    ):
        try:
            tiny = tiny_sam3(Path(scratch.name))
        except Exception as exc:  # the export failing must not cost the other rows
            print(f"\nthe tiny SAM 3 could not be exported: {exc}")
            tiny = None
        if tiny is not None:
            specs.append(tiny)
    rows: list[dict[str, Any]] = []
    oom_rows: list[dict[str, Any]] = []
    part_rows: list[dict[str, Any]] = []
    for spec, manifest in specs:
        name = spec.name
        requests = requests_for(spec)
        try:
            verify_files(spec)
        except Exception as exc:
            rows.append({"model": name, "variant": "-", "runs_on": f"not checked: {exc}"[:90]})
            continue
        if not requests:
            continue
        if "embedding_cache_mb" in spec.options:  # every request runs the encoder: what a new image costs
            spec = dataclasses.replace(spec, options={**spec.options, "embedding_cache_mb": 0})
        if spec.adapter == SAM3_ADAPTER:  # and the text encoder: what a new image and a new phrase cost
            spec = dataclasses.replace(spec, options={**spec.options, "embedding_cache_mb": 0, "text_cache_mb": 0})
        reference = None
        for variant in variants:
            run_spec = spec
            if variant.fp16_files:
                fp16 = fp16_spec(spec, manifest, settings.models_dir)
                if fp16 is None:
                    rows.append(
                        {
                            "model": name,
                            "variant": variant.name,
                            "runs_on": "no fp16 variant (no files of its own, or no onnx to make them)",
                        }
                    )
                    continue
                run_spec = fp16
            runtime = dataclasses.replace(
                base,
                gpu_mem_limit_mb=None,
                trt_cache_dir=(
                    str(Path(base.trt_cache_dir) / f"{name}-{spec.version}{'-fp16' if variant.trt_fp16 else ''}")
                    if base.trt_cache_dir
                    else None
                ),
            )
            try:
                row, masks = measure(run_spec, variant, runtime, requests, args.repeats, watch, reference)
            except Exception as exc:  # one provider that cannot run a model must not cost the other rows
                rows.append({"model": name, "variant": variant.name, "runs_on": f"failed: {exc}"[:90]})
                continue
            if reference is None:
                reference, cpu_median = masks, row["median_s"]
            row["speed_vs_cpu"] = round(cpu_median / row["median_s"], 2) if row["median_s"] else ""
            rows.append(row)
            if spec.adapter == SAM3_ADAPTER:
                try:
                    part_rows += sam3_part_rows(run_spec, variant, runtime, args.repeats)
                except Exception as exc:  # as above: one provider's failure is a row, not the end
                    part_rows.append({"model": name, "variant": variant.name, "part": f"failed: {exc}"[:90]})
        cuda_row = next(
            (r for r in rows if r["model"] == name and r["variant"] == "CUDA fp32" and "setup_mb" in r), None
        )
        if cuda_row:
            oom_rows.append(forced_out_of_memory(spec, base, requests, cuda_row["setup_mb"]))
    scratch.cleanup()
    print()
    print(format_table("models: CPU against CUDA and TensorRT", rows))
    if part_rows:
        print()
        print(format_table("SAM 3 parts alone (median of the runs after the first)", part_rows))
    if oom_rows:
        print()
        print(format_table("out of memory forced with gpu_mem_limit", oom_rows))
    if on_gpu and not args.quick:
        print("\n" + service_efficiency_on_gpu())
    return 0


if __name__ == "__main__":
    sys.exit(main())
