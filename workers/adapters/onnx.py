"""The one place that creates ONNX Runtime sessions."""
from __future__ import annotations

import logging

from workers.adapters.base import RuntimeOptions

log = logging.getLogger(__name__)


def create_session(path: str, runtime: RuntimeOptions):
    """An ``InferenceSession`` for ``path`` with this deployment's providers and threads.

    Providers the installed onnxruntime build lacks are dropped (with a log
    line) rather than failing, so a CUDA-first configuration still starts on
    a CPU-only machine; the CPU provider is always the last resort.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = runtime.intra_op_threads
    options.inter_op_num_threads = runtime.inter_op_threads
    available = set(ort.get_available_providers())
    providers = [p for p in runtime.providers if p in available]
    missing = [p for p in runtime.providers if p not in available]
    if missing:
        log.info("onnxruntime lacks providers %s; using %s", missing, providers or ["CPUExecutionProvider"])
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")
    return ort.InferenceSession(path, sess_options=options, providers=providers)
