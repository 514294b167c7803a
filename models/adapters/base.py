"""The model adapter contract: how a model plugs into maskq.

A worker process holds one adapter per model of the manifest. The lifecycle is fixed:

1. ``__init__(spec)`` is cheap: it only remembers where the model files are.
   It runs in the web process too, so it must never import onnxruntime or
   read a model file. What the model can take (prompt kinds, whether it needs
   a prompt, whether it stacks batches) is its :class:`Capabilities`: the
   class declares them (``prompt_kinds``, ``requires_prompt``,
   ``stacks_batches``); the manifest reader works out a pipeline's from its
   steps and puts them in the spec (``spec.capabilities``); read them on an
   instance as ``adapter.capabilities``, or without an adapter through
   ``models.catalog.ModelCatalog.capabilities``.
2. ``options``: the class's ``Options`` (a pydantic model, unknown fields
   forbidden) checks the manifest entry's ``options`` when the manifest is
   read, so a typo is an error naming the model and the field.
3. ``setup(context)`` runs once per worker process and model version, never
   at import and never per job. The :class:`AdapterContext` holds the
   runtime options (create ONNX Runtime sessions with
   :func:`models.adapters.onnx.create_session` and ``context.runtime`` so
   every session honours the deployment's providers and threads), the
   process's encoder cache (``context.encoder_cache``,
   :mod:`models.encoder_cache`) and the other models' adapters, already set
   up (``context.adapter(name)``): a pipeline runs its steps on them rather
   than opening sessions of its own.
4. ``preprocess(requests) -> (tensors, metas)`` turns a batch of decoded
   images and their prompts into model inputs; ``metas`` carries whatever
   ``postprocess`` needs to map results back to each original image (scale
   factors, padding, the prompts).
5. ``predict(tensors) -> outputs`` is the only method that calls ONNX Runtime.
   It receives the whole batch.
6. ``postprocess(outputs, metas) -> instances`` returns, for each request of
   the batch, the list of :class:`Instance` found, already filtered by that
   request's prompts and expressed in the original (upright) image's pixels.

``segment(requests)`` runs 4-6; an adapter that is not one model (a
pipeline, :mod:`models.adapters.pipeline`) overrides ``segment`` instead.

A minimal adapter::

    class ThresholdAdapter(ModelAdapter):
        prompt_kinds = frozenset({"boxes"})

        class Options(AdapterOptions):
            threshold: float = 0.5

        def setup(self, context):
            self.threshold = self.read_options().threshold
            self.session = create_session(self.spec.files["model"], context.runtime)

        def preprocess(self, requests):
            return [r.image for r in requests], [r.prompts for r in requests]

        def predict(self, tensors):
            return [self.session.run(None, {"image": t})[0] for t in tensors]

        def postprocess(self, outputs, metas):
            return [[Instance(mask=o[0] > self.threshold, score=1.0)] for o in outputs]

and its manifest entry (``files`` relative to the manifest)::

    [models.threshold]
    version = "1"
    adapter = "mypackage.threshold:ThresholdAdapter"
    files = { model = "threshold.onnx" }
    options = { threshold = 0.6 }

Adapters raise :class:`domain.errors.ModelError` for a model that misbehaves;
anything they raise is reported on the job, never crashes the worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from domain.errors import ModelError
from domain.schemas import PROMPT_KINDS, JobRequest  # the one list of prompt kinds
from models.encoder_cache import EncoderCache, EncodingKey, file_sha256

if TYPE_CHECKING:
    from config.settings import Settings


@dataclass(frozen=True)
class Prompts:
    """The prompts of one request, in pixels of the upright image.

    ``points`` are ``(x, y, label)`` with label 1 for foreground and 0 for
    background; ``boxes`` are ``(x0, y0, x1, y1)``; ``exemplars`` are
    ``(x0, y0, x1, y1, label)``: "every instance like this" (label 1) or "not
    like this" (0); ``mask`` is a boolean array of the image's height and width.
    """

    text: tuple[str, ...] = ()
    points: tuple[tuple[float, float, int], ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    exemplars: tuple[tuple[float, float, float, float, int], ...] = ()
    mask: np.ndarray | None = None

    @property
    def kinds(self) -> frozenset[str]:
        """The prompt kinds this request uses."""
        return frozenset(kind for kind in PROMPT_KINDS if _given(getattr(self, kind)))

    @property
    def empty(self) -> bool:
        """No prompt at all: the request asks for every instance."""
        return not self.kinds


def _given(prompt: Sequence[object] | np.ndarray | None) -> bool:
    """Whether a prompt field holds anything (a mask is an array, whose truth is no answer)."""
    return prompt is not None and (isinstance(prompt, np.ndarray) or len(prompt) > 0)


@dataclass(frozen=True)
class SegmentRequest:
    """One image (RGB, ``uint8``, ``H x W x 3``, upright) and its prompts.

    ``image_id`` names the image's content (the SHA256 of the uploaded bytes),
    so an adapter can reuse work done on the same image by an earlier job; it
    is None when the caller has no such name. ``scope`` (the tenant) bounds
    who may share that work. ``request`` is the job's typed request itself,
    the object the web parsed and the record keeps (``JobRecord.request``,
    never parsed again on the way); None when an adapter is driven directly.
    ``prompts`` are its prompts in pixels (the mask decoded), ``options`` its
    options for the model (``JobRequest.adapter_options``: ``points_per_side``),
    both built from it once by the worker. An adapter may note how it ran the request in
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
    request: JobRequest | None = None
    # False: an encoder's output for this image is not kept in the encoder cache (a video's frames are each
    # seen once; kept, they would only push out the embeddings of images that are prompted again).
    cache_encoding: bool = True


@dataclass
class Instance:
    """One segmented object: a boolean mask of the image's size, a score and a label.

    ``object_id`` follows one object across the frames of a video (or the steps of a
    pipeline), ``frame`` says which frame of a video it is in; both None for an image.
    ``box`` is the model's own box ``(x0, y0, x1, y1)`` in pixels, for a model that
    predicts one apart from the mask (SAM 3's detector); None otherwise.
    """

    mask: np.ndarray
    score: float
    label: str | None = None
    object_id: int | None = None
    frame: int | None = None
    box: tuple[float, float, float, float] | None = None


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
    def from_settings(cls, settings: Settings) -> RuntimeOptions:
        """The deployment's ``MASKQ_ORT_*`` settings (a worker and a benchmark must agree on them).

        A worker narrows them to its device (``workers.devices.Placement``)."""
        return cls(
            providers=tuple(settings.ort_providers) or ("CPUExecutionProvider",),
            intra_op_threads=settings.ort_intra_op_threads,
            inter_op_threads=settings.ort_inter_op_threads,
            arena_shrinkage=settings.gpu_arena_shrinkage,
        )


@dataclass(frozen=True)
class Capabilities:
    """What a model can take: its prompt kinds, whether it needs a prompt, whether it stacks batches."""

    prompt_kinds: frozenset[str] = frozenset()
    # False: no prompt is a request too ("segment everything", "every region").
    requires_prompt: bool = False
    # True: predict() runs a whole batch as one stacked inference call (workers/batching.py).
    stacks_batches: bool = False


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
    # A pipeline's steps (names of other models of the manifest, run in order); () for one model.
    steps: tuple[str, ...] = ()
    # What the manifest reader worked out the model can take (a pipeline's, from its steps);
    # None: what the adapter class declares.
    capabilities: Capabilities | None = None


class AdapterOptions(BaseModel):
    """An adapter's ``options`` (the manifest entry's): subclass it as ``Options`` on the adapter.

    Unknown fields are refused, so a typo in the manifest is an error when it is read.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class AdapterContext:
    """What an adapter gets at set-up: the runtime, the process's encoder cache, the other models.

    ``adapters`` looks up another model's adapter by name, set up before this
    one (a pipeline's steps are); :meth:`adapter` says clearly when there is none.
    """

    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    encoder_cache: EncoderCache = field(default_factory=EncoderCache)
    adapters: Callable[[str], ModelAdapter | None] = lambda name: None

    def adapter(self, name: str) -> ModelAdapter:
        found = self.adapters(name)
        if found is None:
            raise ModelError(f"model {name!r} is not loaded in this worker")
        return found


class ModelAdapter:
    """Base class of every model adapter; see the module docstring for the lifecycle."""

    # What the class can take (its Capabilities; a pipeline's come from its steps, in its spec).
    prompt_kinds: ClassVar[frozenset[str]] = frozenset()
    # True for models that cannot "segment everything" and need at least one prompt.
    requires_prompt: ClassVar[bool] = False
    # True for an adapter whose predict() runs a whole batch as one stacked inference call. Only then
    # does a worker take more queued jobs along (workers/batching.py, with the manifest's
    # max_batch_size > 1): for an adapter that loops image by image, a batch would only add waiting.
    stacks_batches: ClassVar[bool] = False
    # True for an adapter that video jobs can run on: point/box/mask prompted, so each object's last mask
    # can prompt it on the next frame (models/video_tracking.py).
    follows_video: ClassVar[bool] = False
    # The manifest entry's options, checked when the manifest is read.
    Options: ClassVar[type[AdapterOptions]] = AdapterOptions

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @classmethod
    def declared_capabilities(cls) -> Capabilities:
        """What the class declares it can take."""
        return Capabilities(frozenset(cls.prompt_kinds), cls.requires_prompt, cls.stacks_batches)

    @classmethod
    def capabilities_with(cls, roles: frozenset[str]) -> Capabilities:
        """What a model of this class can take with files of these roles (the manifest reader asks): by default
        what the class declares; an adapter whose optional files add prompt kinds (SAM 3's tracker) says so."""
        return cls.declared_capabilities()

    @property
    def capabilities(self) -> Capabilities:
        """What this model can take: its spec's (worked out by the manifest reader), else its class's."""
        return self.spec.capabilities or self.declared_capabilities()

    @classmethod
    def check_text(cls, phrases: Sequence[str]) -> None:
        """Refuse the ``text`` prompts this model cannot know: raise :class:`domain.errors.ValidationFailed` naming
        ``prompts.text.N``. The web calls it at submit (``ModelCatalog.check_text``; a pipeline's first
        step's), so such a job is a ``422``, never a failed job. Default: any text is a request."""

    def read_options(self) -> AdapterOptions:
        """``spec.options`` as the class's ``Options`` (the manifest reader checked them; a spec made in code
        is checked here: :class:`ModelError` naming the field)."""
        try:
            return self.Options.model_validate(self.spec.options)
        except ValidationError as exc:
            raise ModelError(
                f"model {self.spec.name}: options: "
                + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            ) from None

    def setup(self, context: AdapterContext) -> None:
        raise NotImplementedError

    def part_digest(self, role: str) -> str:
        """The sha256 of the file of ``role``: the manifest's (checked before set-up), else read from the file.

        Names a model part in :mod:`models.encoder_cache`, so two models on one file share its entries.
        """
        digest = self.spec.sha256.get(role)
        if digest:
            return digest
        return file_sha256(self.spec.files[role])

    def cache_stats(self) -> dict[str, int] | None:
        """This model's encoder-cache counters for the heartbeat (``embedding_caches``); None without a cache."""
        return None

    def execution_providers(self) -> list[str]:
        """The ONNX Runtime providers this adapter's sessions run on (those made by ``create_session``
        and kept as attributes): what the heartbeat and ``GET /v1/models`` show."""
        return sorted({p for value in vars(self).values() for p in getattr(value, "execution_providers", ())})

    def warm(self, request: SegmentRequest) -> EncodingKey | None:
        """Run the image encoder on ``request``'s image alone, ahead of any prompt, and keep its outputs in the
        encoder cache where a job on the same image (``image_id``, ``scope``) finds them: ``POST /v1/images``
        queues it (``workers/image_encoding.py``). Return the entry's key; may note ``report["embedding"]``
        and ``timings["encode"]`` as ``segment`` does. Default: the model has no encoder to run ahead (None)."""
        return None

    @classmethod
    def can_warm(cls) -> bool:
        """Whether the class runs an encoder ahead of prompts (overrides :meth:`warm`): the web asks before it
        queues an encode."""
        return cls.warm is not ModelAdapter.warm

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
