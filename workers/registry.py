"""The model catalog (from the manifest) and the adapters a worker process has loaded."""
from __future__ import annotations

import importlib
import logging
import tomllib
from pathlib import Path

from tasks.errors import ModelError, ValidationFailed
from workers.adapters.base import ModelAdapter, ModelSpec, RuntimeOptions

log = logging.getLogger(__name__)


class ModelCatalog:
    """The models a deployment serves, by name, as the manifest lists them.

    Reading it imports each adapter's module for its ``prompt_kinds`` but
    loads no model: the web front end uses the catalog too.
    """

    def __init__(self, specs: dict[str, ModelSpec], default: str):
        if default not in specs:
            raise ValueError(f"the default model {default!r} is not in the manifest")
        self.specs = specs
        self.default = default

    @classmethod
    def load(cls, path: Path) -> "ModelCatalog":
        path = Path(path)
        with path.open("rb") as f:
            manifest = tomllib.load(f)
        specs = {}
        for name, entry in manifest.get("models", {}).items():
            files = {k: str((path.parent / v).resolve()) for k, v in entry.get("files", {}).items()}
            specs[name] = ModelSpec(
                name=name, version=str(entry["version"]), adapter=entry["adapter"],
                files=files, options=dict(entry.get("options", {})),
                memory_mb=float(entry.get("memory_mb", 512)),
                soft_time_limit_s=entry.get("soft_time_limit_s"),
                hard_time_limit_s=entry.get("hard_time_limit_s"),
            )
        return cls(specs, manifest.get("default") or next(iter(specs)))

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
        module_name, _, class_name = self.spec(name).adapter.partition(":")
        return getattr(importlib.import_module(module_name), class_name)

    def time_limits(self, name: str | None, settings) -> tuple[float, float]:
        """``(soft, hard)`` seconds for one job of this model."""
        spec = self.spec(name)
        return (spec.soft_time_limit_s or settings.job_soft_time_limit_s,
                spec.hard_time_limit_s or settings.job_hard_time_limit_s)

    def check_time_limits(self, settings) -> None:
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

    def prompt_kinds(self, name: str | None) -> frozenset[str]:
        return self.adapter_class(name).prompt_kinds


class LoadedModels:
    """The adapters set up in this worker process (``setup`` ran once, at process start)."""

    def __init__(self, catalog: ModelCatalog, runtime: RuntimeOptions):
        self.catalog = catalog
        self.runtime = runtime
        self.adapters: dict[str, ModelAdapter] = {}

    def load_all(self) -> None:
        for name in self.catalog.specs:
            spec = self.catalog.spec(name)
            adapter = self.catalog.adapter_class(name)(spec)
            adapter.setup(self.runtime)
            self.adapters[name] = adapter
            log.info("model %s version %s loaded", name, spec.version)

    def get(self, name: str) -> ModelAdapter:
        try:
            return self.adapters[name]
        except KeyError:
            raise ModelError(f"model {name!r} is not loaded in this worker") from None
