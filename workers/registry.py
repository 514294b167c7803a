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
