"""The model adapter contract: how a model plugs into maskq.

A worker process holds one adapter per model. The lifecycle is fixed:

1. ``__init__(spec)`` is cheap: it only remembers where the model files are.
   It runs in the web process too (to read ``prompt_kinds``), so it must never
   import onnxruntime or read a model file.
2. ``setup(runtime)`` runs once per worker process (from
   ``worker_process_init``), never at import and never per job. Create the
   ONNX Runtime sessions here with :func:`models.adapters.onnx.create_session`
   so every session honours the deployment's providers and thread settings.
3. ``preprocess(requests) -> (tensors, metas)`` turns a batch of decoded
   images and their prompts into model inputs; ``metas`` carries whatever
   ``postprocess`` needs to map results back to each original image (scale
   factors, padding, the prompts).
4. ``predict(tensors) -> outputs`` is the only method that calls ONNX Runtime.
   It receives the whole batch.
5. ``postprocess(outputs, metas) -> instances`` returns, for each request of
   the batch, the list of :class:`Instance` found, already filtered by that
   request's prompts and expressed in the original (upright) image's pixels.

A minimal adapter::

    class ThresholdAdapter(ModelAdapter):
        name, version = "threshold", "1"
        prompt_kinds = frozenset({"boxes"})

        def setup(self, runtime):
            self.session = create_session(self.spec.files["model"], runtime)

        def preprocess(self, requests):
            return [r.image for r in requests], [r.prompts for r in requests]

        def predict(self, tensors):
            return [self.session.run(None, {"image": t})[0] for t in tensors]

        def postprocess(self, outputs, metas):
            return [[Instance(mask=o[0] > 0.5, score=1.0)] for o in outputs]

Adapters raise :class:`domain.errors.ModelError` for a model that misbehaves;
anything they raise is reported on the job, never crashes the worker.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

PROMPT_KINDS = frozenset({"text", "points", "boxes", "mask"})


@dataclass(frozen=True)
class Prompts:
    """The prompts of one request, in pixels of the upright image.

    ``points`` are ``(x, y, label)`` with label 1 for foreground and 0 for
    background; ``boxes`` are ``(x0, y0, x1, y1)``; ``mask`` is a boolean
    array of the image's height and width.
    """

    text: tuple[str, ...] = ()
    points: tuple[tuple[float, float, int], ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    mask: np.ndarray | None = None

    @property
    def kinds(self) -> frozenset[str]:
        """The prompt kinds this request uses."""
        present = {
            "text": bool(self.text),
            "points": bool(self.points),
            "boxes": bool(self.boxes),
            "mask": self.mask is not None,
        }
        return frozenset(kind for kind, used in present.items() if used)

    @property
    def empty(self) -> bool:
        """No prompt at all: the request asks for every instance."""
        return not self.kinds


@dataclass(frozen=True)
class SegmentRequest:
    """One image (RGB, ``uint8``, ``H x W x 3``, upright) and its prompts.

    ``image_id`` names the image's content (the SHA256 of the uploaded bytes),
    so an adapter can reuse work done on the same image by an earlier job; it
    is None when the caller has no such name. ``scope`` (the tenant) bounds
    who may share that work. ``options`` are the request's model options
    (``points_per_side``). An adapter may note how it ran the request in
    ``report`` (``{"embedding": {"cached": True, ...}}``); the worker stores
    those notes with the job's result. ``timings`` takes the seconds of named
    phases an adapter can tell apart (``encode``): the job's ``metrics``.
    """

    image: np.ndarray
    prompts: Prompts = field(default_factory=Prompts)
    image_id: str | None = None
    scope: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Instance:
    """One segmented object: a boolean mask of the image's size, a score and a label."""

    mask: np.ndarray
    score: float
    label: str | None = None


@dataclass(frozen=True)
class RuntimeOptions:
    """How this deployment runs ONNX Runtime (from the settings), narrowed per model by its manifest entry."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    # providers_required: the model's manifest lists its own providers, and a session must get one of
    # them (none there: the model fails to load and its fallback serves); else CPU is the last resort.
    providers_required: bool = False
    fp16: bool = False  # TensorRT builds fp16 engines
    # The GPU side (models/adapters/onnx.py: provider_options): the CUDA ordinal among the visible devices
    # (workers/devices.py maps it to NVML's), the most one session's CUDA arena may hold (the model's
    # memory_mb), whether the arena gives memory back after each run, and the TensorRT engine cache.
    device_id: int = 0
    gpu_mem_limit_mb: float | None = None
    arena_shrinkage: bool = True
    trt_cache_dir: str | None = None

    @classmethod
    def from_settings(cls, settings) -> "RuntimeOptions":
        """The deployment's ``MASKQ_ORT_*`` settings (a worker and a benchmark must agree on them).

        A worker narrows them to its device (``workers.devices.Placement``)."""
        return cls(providers=tuple(settings.ort_providers) or ("CPUExecutionProvider",),
                   intra_op_threads=settings.ort_intra_op_threads,
                   inter_op_threads=settings.ort_inter_op_threads, arena_shrinkage=settings.gpu_arena_shrinkage)


@dataclass(frozen=True)
class ModelSpec:
    """Where one model's files are and what it is called; from the model catalog."""

    name: str
    version: str
    adapter: str
    files: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    # What one job needs on the device (for the resource gate), and its time limits
    # (None: the deployment's defaults).
    memory_mb: float = 512
    soft_time_limit_s: float | None = None
    hard_time_limit_s: float | None = None
    # ONNX Runtime providers in order of preference (None: the deployment's MASKQ_ORT_PROVIDERS);
    # fp16 (the catalog has already swapped in the files' "_fp16" variants).
    providers: tuple[str, ...] | None = None
    fp16: bool = False
    # The most requests one predict() call may be given (dynamic batching reads it).
    max_batch_size: int = 1
    # The model whose adapter runs this model's jobs while this one cannot be loaded.
    fallback: str | None = None
    # The sha256 of each file (checked before set-up), and where the files come from (the manifest's
    # [models.NAME.source]: package, tarball checksum, licence), shown by GET /v1/models.
    sha256: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] | None = None


class ModelAdapter:
    """Base class of every model adapter; see the module docstring for the lifecycle."""

    prompt_kinds: ClassVar[frozenset[str]] = frozenset()
    # True for models that cannot "segment everything" and need at least one prompt.
    requires_prompt: ClassVar[bool] = False
    # An embedding store shared by every worker process (workers/shared_embeddings.py), given by the
    # worker after set-up to adapters that can use one; None: this process's own memory only.
    shared_embeddings: Any = None
    # True for an adapter whose predict() runs a whole batch as one stacked inference call. Only then
    # does a worker take more queued jobs along (workers/batching.py, with the manifest's
    # max_batch_size > 1): for an adapter that loops image by image, a batch would only add waiting.
    stacks_batches: ClassVar[bool] = False

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    def setup(self, runtime: RuntimeOptions) -> None:
        raise NotImplementedError

    def execution_providers(self) -> list[str]:
        """The ONNX Runtime providers this adapter's sessions run on (those made by ``create_session``
        and kept as attributes): what the heartbeat and ``GET /v1/models`` show."""
        return sorted({p for value in vars(self).values() for p in getattr(value, "execution_providers", ())})

    def preprocess(self, requests: Sequence[SegmentRequest]) -> tuple[Any, list[Any]]:
        raise NotImplementedError

    def predict(self, tensors: Any) -> Any:
        raise NotImplementedError

    def postprocess(self, outputs: Any, metas: list[Any]) -> list[list[Instance]]:
        raise NotImplementedError

    def segment(self, requests: Sequence[SegmentRequest]) -> list[list[Instance]]:
        """Run the whole lifecycle on one batch."""
        tensors, metas = self.preprocess(requests)
        return self.postprocess(self.predict(tensors), metas)
