"""The model catalog: the models a deployment serves, from the manifest, followed as it changes.

The web uses it to validate a submission; a worker to know what to load
(``workers/loaded_models.py``). Nothing here loads a model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from config.settings import Settings
from domain.errors import ValidationFailed
from models.adapters.base import Capabilities, ModelAdapter, ModelSpec
from models.manifest import ROUTE_KINDS, ManifestFile, RouteKind, import_adapter, read_manifest

log = logging.getLogger(__name__)

DEFAULT_MODELS_DIR = Settings.model_fields["models_dir"].default


class ModelCatalog:
    """The models a deployment serves, by name, as one reading of the manifest lists them.

    Reading it imports each adapter's module for its capabilities (a
    pipeline's are worked out from its steps') but loads no model: the web
    front end uses the catalog too. A catalog never
    changes; :class:`LiveCatalog` swaps in a new one when the file changes.
    """

    def __init__(self, specs: dict[str, ModelSpec], default: str, routes: Mapping[RouteKind, str] | None = None):
        if default not in specs:
            raise ValueError(f"the default model {default!r} is not in the manifest")
        self.specs = specs
        self.default = default
        self.routes = dict(routes or {})

    @classmethod
    def load(cls, path: Path, models_dir: Path = DEFAULT_MODELS_DIR) -> ModelCatalog:
        """The catalog of a manifest file; :class:`models.manifest.ManifestError` if it is invalid.

        ``models_dir`` is where ``{models_dir}`` in the manifest's file paths points (``MASKQ_MODELS_DIR``).
        """
        path = Path(path)
        manifest = read_manifest(path)
        return cls(manifest.specs(path.parent, models_dir), manifest.default_model, manifest.routes)

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelCatalog:
        return cls.load(settings.models_manifest, settings.models_dir)

    def route(self, prompt_kinds: frozenset[str] | set[str]) -> str:
        """The model a job that names none goes to, by its prompt kinds (the manifest's ``routes``)."""
        for kind in ROUTE_KINDS:
            if (kind in prompt_kinds or (kind == "none" and not prompt_kinds)) and kind in self.routes:
                return self.routes[kind]
        return self.default

    def current(self, force: bool = False) -> ModelCatalog:
        return self

    def spec(self, name: str | None) -> ModelSpec:
        name = name or self.default
        try:
            return self.specs[name]
        except KeyError:
            raise ValidationFailed(
                f"unknown model {name!r}; this deployment serves: {', '.join(sorted(self.specs))}",
                errors=[{"field": "model", "message": f"unknown model {name!r}"}],
            ) from None

    def adapter_class(self, name: str | None) -> type[ModelAdapter]:
        return import_adapter(self.spec(name).adapter)

    def time_limits(self, name: str | None, settings: Settings, media: str = "image") -> tuple[float, float]:
        """``(soft, hard)`` seconds for one job of this model; a video job has the deployment's video limits."""
        if media == "video":
            return settings.video_time_limits
        spec = self.spec(name)
        return (
            spec.soft_time_limit_s or settings.job_soft_time_limit_s,
            spec.hard_time_limit_s or settings.job_hard_time_limit_s,
        )

    def check_time_limits(self, settings: Settings) -> None:
        """Refuse a manifest whose hard limits outlast the broker's visibility timeout (celery#5935)."""
        for name in self.specs:
            soft, hard = self.time_limits(name, settings)
            if not soft < hard < settings.visibility_timeout_s:
                raise ValueError(
                    f"model {name!r}: need soft time limit ({soft} s) < hard time limit ({hard} s) < "
                    f"MASKQ_VISIBILITY_TIMEOUT_S ({settings.visibility_timeout_s} s); otherwise a job still "
                    "running would be handed to a second worker"
                )

    def memory_per_job_mb(self) -> float:
        """What the hungriest model needs for one job: a worker may serve any of them next."""
        return max(spec.memory_mb for spec in self.specs.values())

    def capabilities(self, name: str | None) -> Capabilities:
        """What model ``name`` can take (prompt kinds, whether it needs a prompt, whether it stacks batches)."""
        spec = self.spec(name)
        return spec.capabilities or self.adapter_class(name).declared_capabilities()

    def prompt_kinds(self, name: str | None) -> frozenset[str]:
        return self.capabilities(name).prompt_kinds

    def requires_prompt(self, name: str | None) -> bool:
        return self.capabilities(name).requires_prompt

    def check_text(self, name: str | None, phrases: list[str] | tuple[str, ...]) -> None:
        """Refuse ``text`` prompts model ``name`` cannot know (``ValidationFailed``, a ``422`` naming
        ``prompts.text``): its adapter class's ``check_text``, a pipeline's first step's (which gets them)."""
        if not phrases:
            return
        spec = self.spec(name)
        while spec.steps:
            spec = self.specs[spec.steps[0]]
        import_adapter(spec.adapter).check_text(phrases)

    def missing_files(self, name: str) -> dict[str, list[str]]:
        """The roles whose files are not on disk, by model: ``name``'s own and, for a pipeline, its steps'."""
        missing: dict[str, list[str]] = {}
        own = sorted(role for role, path in self.specs[name].files.items() if not Path(path).is_file())
        if own:
            missing[name] = own
        for step in self.specs[name].steps:
            missing.update(self.missing_files(step))
        return missing

    def unavailable(self, name: str) -> str | None:
        """Why no worker can run ``name``'s jobs, known without asking one: files missing (own or a step's)
        and no fallback to stand in. None when it may run."""
        if self.specs[name].fallback is not None:
            return None
        missing = self.missing_files(name)
        return missing_reason(name, missing, self.specs) if missing else None

    def setup_order(self) -> list[str]:
        """The models in an order that sets each pipeline's steps up before it (the manifest has no cycles)."""
        order: list[str] = []

        def visit(name: str) -> None:
            if name not in order:
                for step in self.specs[name].steps:
                    visit(step)
                order.append(name)

        for name in self.specs:
            visit(name)
        return order

    def fallbacks(self, name: str) -> list[str]:
        """The models that stand in for ``name``, in order (the manifest has no cycles)."""
        chain: list[str] = []
        step = self.specs[name].fallback
        while step is not None:
            chain.append(step)
            step = self.specs[step].fallback
        return chain


class LiveCatalog:
    """The catalog of a manifest file that may change while the process runs.

    :meth:`current` re-reads the file when it changed (checked with one
    ``os.stat`` at most every ``check_s`` seconds). A new manifest that does
    not validate is logged and ignored: the last good catalog stays in force,
    and :attr:`error` says why. Read the models through ``current()``, once
    where several reads must agree (one submission).
    """

    def __init__(self, path: Path, check_s: float, settings: Settings | None = None):
        self.path = Path(path)
        self.settings = settings
        self.error: str | None = None
        self._lock = threading.Lock()
        self.file = ManifestFile(self.path, check_s)  # stamped before the read: a change in between is seen
        self._catalog = self._read()

    def _read(self) -> ModelCatalog:
        models_dir = self.settings.models_dir if self.settings is not None else DEFAULT_MODELS_DIR
        catalog = ModelCatalog.load(self.path, models_dir)
        if self.settings is not None:
            catalog.check_time_limits(self.settings)
        return catalog

    def current(self, force: bool = False) -> ModelCatalog:
        with self._lock:
            if self.file.changed(force):
                try:
                    self._catalog = self._read()
                    self.error = None
                    log.info(
                        "model manifest %s re-read: %s",
                        self.path,
                        {name: spec.version for name, spec in self._catalog.specs.items()},
                    )
                except Exception as exc:  # ManifestError, refused time limits: never take the service down
                    self.error = str(exc)
                    log.error(
                        "model manifest %s changed but cannot be used; keeping the last good one: %s", self.path, exc
                    )
            return self._catalog


def missing_reason(name: str, missing: dict[str, list[str]], specs: Mapping[str, ModelSpec]) -> str:
    """``missing`` (roles by model, :meth:`ModelCatalog.missing_files`) in words."""
    parts = []
    for model, roles in missing.items():
        files = f"its {', '.join(roles)} file{'s are' if len(roles) > 1 else ' is'} missing" + (
            " (not fetched: run `make models`)" if specs[model].source else ""
        )
        parts.append(files if model == name else f"its step {model!r}: {files}")
    return "; ".join(parts)


def describe_models(catalog: ModelCatalog, workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each model of ``catalog`` with what the live workers' heartbeats say about it (``GET /v1/models``)."""
    models = []
    for name, spec in catalog.specs.items():
        versions = sorted({w["models"][name] for w in workers if name in w.get("models", {})})
        errors = sorted(
            {
                e["error"]
                for w in workers
                if (e := w.get("model_errors", {}).get(name)) and e.get("version") == spec.version
            }
        )
        entry = {
            "name": name,
            "version": spec.version,
            "default": name == catalog.default,
            "prompt_kinds": sorted(catalog.prompt_kinds(name)),
            "loaded": spec.version in versions,
            "loaded_versions": versions,
            "fallback": spec.fallback,
            "max_batch_size": spec.max_batch_size,
            # What the live workers run it on: ONNX Runtime providers, and devices ("cpu", "cuda:0 <GPU> <UUID>").
            "providers": sorted({p for w in workers for p in w.get("providers", {}).get(name, [])}),
            "devices": sorted({w["device"] for w in workers if name in w.get("models", {}) and w.get("device")}),
        }
        if spec.source is not None:
            provenance = {
                "package": f"npm {spec.source['npm']}",
                "package_sha256": spec.source["sha256"],
                "license": spec.source["license"],
                "description": spec.source["description"],
                "files_sha256": dict(spec.sha256),
            }
            if spec.source.get("convert"):  # a file made from the fetched ones at install time
                provenance["converted"] = spec.source["convert"]
            entry["provenance"] = provenance
        if spec.steps:
            entry["steps"] = list(spec.steps)
        missing = catalog.missing_files(name)
        if missing:  # known without asking a worker: nothing can load it (nor a pipeline on it)
            entry["error"] = missing_reason(name, missing, catalog.specs)
        elif errors:
            entry["error"] = errors[0]
        entry["available"] = "error" not in entry and (entry["loaded"] or not workers)
        models.append(entry)
    return models
