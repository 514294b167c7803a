"""The one place that creates ONNX Runtime sessions."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from domain.errors import ModelError
from models.adapters.base import RuntimeOptions

log = logging.getLogger(__name__)


def create_session(path: str, runtime: RuntimeOptions) -> Session:
    """An ``InferenceSession`` for ``path`` with this deployment's providers and threads.

    Providers come in order of preference. A deployment-wide list
    (``MASKQ_ORT_PROVIDERS``) drops the ones the installed onnxruntime build
    lacks (with a log line) rather than failing, so a CUDA-first configuration
    still starts on a CPU-only machine; the CPU provider is always the last
    resort. A model whose manifest lists its own providers
    (``runtime.providers_required``) must get one of those: otherwise this
    raises :class:`ModelError`, the model counts as not loaded, and its
    fallback serves its jobs. ``runtime.fp16`` turns on TensorRT's fp16 mode
    (CUDA has no such switch: it runs an fp16 model file, see the manifest).
    The returned :class:`Session` runs like an ``InferenceSession``.
    """
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls") and {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(runtime.providers):
        ort.preload_dlls()  # the CUDA and cuDNN libraries of the nvidia-* wheels (onnxruntime-gpu[cuda,cudnn])

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = runtime.intra_op_threads
    options.inter_op_num_threads = runtime.inter_op_threads
    available = ort.get_available_providers()
    wanted = list(runtime.providers)
    providers = [p for p in wanted if p in available]
    missing = [p for p in wanted if p not in available]
    if runtime.providers_required:
        if not providers:
            raise ModelError(f"none of the providers {wanted} is available here (onnxruntime offers {available})")
        if missing:
            log.warning("%s: onnxruntime lacks the preferred providers %s; using %s", path, missing, providers)
    else:
        if missing:
            log.info("onnxruntime lacks providers %s; using %s", missing, providers or ["CPUExecutionProvider"])
        if "CPUExecutionProvider" not in providers:
            providers.append("CPUExecutionProvider")
    if runtime.trt_cache_dir and "TensorrtExecutionProvider" in providers:
        Path(runtime.trt_cache_dir).mkdir(parents=True, exist_ok=True)
    engines_before = _engine_count(runtime.trt_cache_dir)
    started = time.monotonic()
    try:
        session = ort.InferenceSession(
            path,
            sess_options=options,
            providers=providers,
            provider_options=[provider_options(p, runtime) for p in providers],
        )
    except Exception as exc:  # onnxruntime's own kinds: a truncated or foreign file, an op it lacks
        # A model that does not load is an expected state (listed unavailable, its fallback serves), not a crash.
        raise ModelError(f"{path} cannot be loaded by ONNX Runtime: {exc}") from exc
    # A provider that is built in but cannot start (no GPU, no CUDA libraries) makes onnxruntime fall back
    # to CPU with only a warning: for a model that asked for specific providers, that is a failure to load.
    active = session.get_providers()
    if runtime.providers_required and not set(active) & set(wanted):
        raise ModelError(f"none of the providers {wanted} could start (onnxruntime runs this on {active})")
    log.info("%s: running on %s", path, active)
    if "TensorrtExecutionProvider" in active:
        built = _engine_count(runtime.trt_cache_dir) - engines_before
        log.info(
            "%s: TensorRT %s in %.1f s (engine cache %s)",
            path,
            f"built {built} engine(s)" if built else "found its engines cached",
            time.monotonic() - started,
            runtime.trt_cache_dir,
        )
    return Session(session, runtime)


def provider_options(provider: str, runtime: RuntimeOptions) -> dict[str, str]:
    """ONNX Runtime's options for ``provider`` under ``runtime`` (pure; unit-tested).

    CUDA: the device, an arena capped at the model's ``memory_mb`` that grows
    only by what is asked (its default doubles). TensorRT: the device, fp16,
    and engine and timing caches on disk, so a restart loads engines instead
    of building them (minutes for a large model).
    """
    if provider == "CUDAExecutionProvider":
        options = {"device_id": str(runtime.device_id), "arena_extend_strategy": "kSameAsRequested"}
        if runtime.gpu_mem_limit_mb:
            options["gpu_mem_limit"] = str(int(runtime.gpu_mem_limit_mb * 2**20))
        return options
    if provider == "TensorrtExecutionProvider":
        options = {"device_id": str(runtime.device_id), "trt_fp16_enable": str(runtime.fp16)}
        if runtime.trt_cache_dir:
            options |= {
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": runtime.trt_cache_dir,
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": runtime.trt_cache_dir,
            }
        return options
    return {}


class Session:
    """An ``InferenceSession`` that gives its CUDA arena's memory back after each run.

    ONNX Runtime's arena keeps what it once took; the resource gate would then
    read a GPU as full for good. Each run asks it to shrink (unless
    ``arena_shrinkage`` is off). Anything else is the session's own.
    """

    def __init__(self, session: Any, runtime: RuntimeOptions) -> None:  # an onnxruntime.InferenceSession
        import onnxruntime as ort

        self.inference_session = session
        self.execution_providers = session.get_providers()
        self.run_options = None
        if runtime.arena_shrinkage and "CUDAExecutionProvider" in self.execution_providers:
            self.run_options = ort.RunOptions()
            self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", f"gpu:{runtime.device_id}")

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        outputs: list[np.ndarray] = self.inference_session.run(output_names, input_feed, self.run_options)
        return outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inference_session, name)


def _engine_count(folder: str | None) -> int:
    if not folder or not Path(folder).is_dir():
        return 0
    return sum(1 for _ in Path(folder).glob("*.engine"))
