"""The adapters one worker process holds, set up from the model catalog and kept in step with it.

Each adapter is set up with an :class:`models.adapters.base.AdapterContext`: the runtime options
narrowed to its model, the process's one encoder cache, and the adapters already set up, so that a
pipeline runs on its steps' adapters (a pipeline's steps are set up before it).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from domain.errors import MaskqError, ModelError
from models.adapters.base import AdapterContext, ModelAdapter, ModelSpec, RuntimeOptions
from models.catalog import LiveCatalog, ModelCatalog
from models.encoder_cache import EncoderCache
from models.fetch import verify_files
from models.manifest import import_adapter
from workers import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFailure:
    """A model version that could not be set up in this process, and why."""

    version: str
    error: str


@dataclass(frozen=True)
class ModelChoice:
    """The adapter a job runs on; ``reason`` is set when it stands in for the model the job asked for."""

    adapter: ModelAdapter
    requested: str
    reason: str | None = None

    @property
    def degraded(self) -> bool:
        return self.reason is not None

    @property
    def model_version(self) -> str | None:
        """The version to record as the job's: None for a stand-in (the requested model did not run)."""
        return None if self.degraded else self.adapter.version

    @property
    def model_used(self) -> dict | None:
        """What the job record keeps about a stand-in (``JobStore.start(model_used=...)``)."""
        if not self.degraded:
            return None
        return {"name": self.adapter.name, "version": self.adapter.version, "reason": self.reason}


class LoadedModels:
    """The adapters set up in this worker process, kept in step with the manifest.

    ``setup`` runs once per model version, never per job. :meth:`refresh`
    (called before each job, and every ``manifest_check_s`` by a watcher
    thread while the process idles) loads new and changed versions and drops
    removed models. A new version is set up before the old one is let go, and
    a job holds the adapter it started with, so a job in flight finishes on
    its version. A model that fails to set up is kept in :attr:`failures`
    (with the old version serving, if there was one); :meth:`choose` then
    gives its jobs to its fallback.

    A pipeline is set up again whenever one of its steps is (a new version,
    say): it always runs on the adapters its steps' models serve with. A step
    that is not loaded leaves the pipeline unloaded too (its fallback serves).
    """

    def __init__(
        self, catalog: ModelCatalog | LiveCatalog, runtime: RuntimeOptions, encoder_cache: EncoderCache | None = None
    ):
        self.catalog = catalog
        self.runtime = runtime
        # Every adapter set up here shares it (models/encoder_cache.py): local, or in front of Redis.
        self.encoder_cache = encoder_cache if encoder_cache is not None else EncoderCache()
        # Replaced, never mutated, so the heartbeat thread can read them while a reload runs.
        self.adapters: dict[str, ModelAdapter] = {}
        self.failures: dict[str, ModelFailure] = {}
        self._synced: ModelCatalog | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def load_all(self) -> None:
        self.refresh()

    def refresh(self, force: bool = False) -> None:
        """Apply the manifest if it changed since the last call (cheap when it did not)."""
        catalog = self.catalog.current(force)
        if catalog is self._synced:
            return
        with self._lock:
            if catalog is not self._synced:
                self._sync(catalog)

    def _sync(self, catalog: ModelCatalog) -> None:
        adapters = {name: a for name, a in self.adapters.items() if name in catalog.specs}
        failures = {}
        for name in catalog.setup_order():  # a pipeline's steps first
            spec = catalog.specs[name]
            old = adapters.get(name)
            if old is not None and old.spec == spec and not self._steps_changed(old, adapters):
                continue
            try:
                adapters[name] = self._set_up(spec, adapters)
                log.info(
                    "model %s version %s loaded%s",
                    name,
                    spec.version,
                    f" (replacing version {old.version})" if old is not None else "",
                )
            except Exception as exc:  # whatever a model does at set-up, the worker stays up
                error = exc.detail if isinstance(exc, MaskqError) else f"{type(exc).__name__}: {exc}"
                failures[name] = ModelFailure(spec.version, error)
                metrics.series().load_failures.labels(name).inc()
                log.error(
                    "model %s version %s failed to load%s: %s",
                    name,
                    spec.version,
                    f"; version {old.version} keeps serving" if old is not None else "",
                    error,
                    exc_info=not isinstance(exc, MaskqError),
                )
        for name in set(self.adapters) - set(adapters):
            log.info("model %s removed from the manifest; unloaded", name)
        loaded = metrics.series().models_loaded
        for name, adapter in self.adapters.items():  # this process's gauge follows what it holds
            if adapters.get(name) is not adapter:
                loaded.labels(name, adapter.version).set(0)
        for name, adapter in adapters.items():
            loaded.labels(name, adapter.version).set(1)
        self.adapters, self.failures, self._synced = adapters, failures, catalog

    @staticmethod
    def _steps_changed(adapter: ModelAdapter, adapters: dict[str, ModelAdapter]) -> bool:
        """Whether a pipeline runs on step adapters other than those its steps' models serve with now."""
        steps = getattr(adapter, "steps", None)
        if not adapter.spec.steps or steps is None:
            return False
        return any(adapters.get(name) is not step for name, step in zip(adapter.spec.steps, steps))

    def _set_up(self, spec: ModelSpec, adapters: dict[str, ModelAdapter]) -> ModelAdapter:
        verify_files(spec)
        adapter = import_adapter(spec.adapter)(spec)
        adapter.setup(self.context_for(spec, adapters))
        return adapter

    def context_for(self, spec: ModelSpec, adapters: dict[str, ModelAdapter]) -> AdapterContext:
        """What ``spec``'s adapter gets at set-up: its runtime, the encoder cache, the adapters set up so far."""
        return AdapterContext(runtime=self.runtime_for(spec), encoder_cache=self.encoder_cache, adapters=adapters.get)

    def runtime_for(self, spec: ModelSpec) -> RuntimeOptions:
        """The deployment's runtime options with this model's providers, fp16, memory cap and engine cache on top."""
        runtime = dataclasses.replace(self.runtime, fp16=spec.fp16, gpu_mem_limit_mb=spec.memory_mb)
        if self.runtime.trt_cache_dir:  # one folder per model version under the GPU model's
            version = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{spec.name}-{spec.version}")
            runtime = dataclasses.replace(runtime, trt_cache_dir=str(Path(self.runtime.trt_cache_dir) / version))
        if spec.providers is None:
            return runtime
        return dataclasses.replace(runtime, providers=spec.providers, providers_required=True)

    def get(self, name: str) -> ModelAdapter:
        try:
            return self.adapters[name]
        except KeyError:
            raise ModelError(f"model {name!r} is not loaded in this worker") from None

    def choose(self, name: str, prompt_kinds: Iterable[str] = ()) -> ModelChoice:
        """The adapter for a job of model ``name``: its own, else the first usable fallback.

        ``prompt_kinds`` are the job's; a fallback that cannot take them does
        not stand in. No adapter at all: :class:`ModelError` naming the load error.
        """
        adapter = self.adapters.get(name)
        if adapter is not None:
            return ModelChoice(adapter, name)
        if self._synced is None or name not in self._synced.specs:
            self.refresh(force=True)  # a model just added: the web may have seen the manifest before we did
            if (adapter := self.adapters.get(name)) is not None:
                return ModelChoice(adapter, name)
        catalog = self._synced
        if catalog is None or name not in catalog.specs:
            raise ModelError(f"model {name!r} is not in this worker's model manifest")
        failure = self.failures.get(name)
        reason = (
            f"model {name!r} version {failure.version} failed to load: {failure.error}"
            if failure
            else f"model {name!r} is not loaded in this worker"
        )
        kinds = frozenset(prompt_kinds)
        refused = []
        for fallback in catalog.fallbacks(name):
            stand_in = self.adapters.get(fallback)
            if stand_in is None:
                refused.append(f"{fallback!r} is not loaded either")
            elif not kinds <= stand_in.capabilities.prompt_kinds or (
                stand_in.capabilities.requires_prompt and not kinds
            ):
                refused.append(f"{fallback!r} cannot take this job's prompts ({', '.join(sorted(kinds)) or 'none'})")
            else:
                return ModelChoice(stand_in, name, reason)
        raise ModelError(f"{reason}; " + ("its fallback " + "; ".join(refused) if refused else "it has no fallback"))

    def describe(self) -> dict:
        """What the heartbeat tells the front end: versions loaded, and load errors."""
        return {
            "models": {name: a.version for name, a in self.adapters.items()},
            "model_errors": {name: dataclasses.asdict(f) for name, f in self.failures.items()},
            "providers": {name: a.execution_providers() for name, a in self.adapters.items()},
        }

    def watch(self, interval_s: float) -> threading.Thread:
        """Refresh every ``interval_s`` from a daemon thread, so an idle process follows the manifest too."""

        def run() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.refresh()
                except Exception:  # never let the watcher die; the next job refreshes anyway
                    log.exception("model manifest watcher")

        thread = threading.Thread(target=run, name="maskq-manifest", daemon=True)
        thread.start()
        return thread

    def stop_watching(self) -> None:
        self._stop.set()
