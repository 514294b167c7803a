"""The one place that creates ONNX Runtime sessions."""
from __future__ import annotations

import logging

from domain.errors import ModelError
from models.adapters.base import RuntimeOptions

log = logging.getLogger(__name__)


def create_session(path: str, runtime: RuntimeOptions):
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
    """
    import onnxruntime as ort

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
    session = ort.InferenceSession(path, sess_options=options, providers=[_configured(p, runtime) for p in providers])
    # A provider that is built in but cannot start (no GPU, no CUDA libraries) makes onnxruntime fall back
    # to CPU with only a warning: for a model that asked for specific providers, that is a failure to load.
    active = session.get_providers()
    if runtime.providers_required and not set(active) & set(wanted):
        raise ModelError(f"none of the providers {wanted} could start (onnxruntime runs this on {active})")
    log.info("%s: running on %s", path, active)
    return session


def _configured(provider: str, runtime: RuntimeOptions):
    """A provider name, or ``(name, options)`` where this runtime asks for more than the defaults."""
    if runtime.fp16 and provider == "TensorrtExecutionProvider":
        return provider, {"trt_fp16_enable": True}
    return provider
