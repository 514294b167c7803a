"""What one worker process holds: settings, connections, and its loaded models.

Built once per pool process by ``worker_process_init`` (never at import, never
per job); tasks reach it with :func:`current`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from dataclasses import dataclass

import redis
from celery.signals import worker_process_init, worker_process_shutdown

from config.settings import Settings, load_settings
from models.adapters.base import RuntimeOptions
from models.catalog import LiveCatalog
from models.encoder_cache import EncoderCache
from runtime import telemetry
from runtime.redis_connection import service_client
from storage import Storage, open_storage
from stores import fleet
from stores.jobs import JobStore
from stores.webhooks import JobEvents
from workers import metrics
from workers.devices import Placement, placement_here, runtime_options
from workers.heartbeat import Heartbeat
from workers.loaded_models import LoadedModels
from workers.redis_outage import ride_out

log = logging.getLogger(__name__)

# Within Celery's worker_proc_alive_timeout (120 s, config/celery.py): a start-up past it is killed.
START_BOUND_S = 60


@dataclass
class WorkerProcess:
    settings: Settings
    redis: redis.Redis
    jobs: JobStore
    storage: Storage
    models: LoadedModels
    heartbeat: Heartbeat | None = None
    placement: Placement | None = None  # where its models run (None in a webhooks-only worker)
    storage_identity: str = ""  # the web checks that it shares this store (webapp/health.py)
    # The jobs this process is running now (announced in its heartbeat; recovery trusts it).
    # Replaced, never changed in place: the heartbeat thread reads it while a job runs.
    running: frozenset[str] = frozenset()

    @property
    def owner(self) -> str:
        """This process's name in the fleet (``host:pid``); the ``worker`` of the jobs it starts."""
        return fleet.this_process()

    @classmethod
    def start(cls, settings: Settings) -> WorkerProcess:
        client = service_client(settings)
        placement = placement_here(settings) if settings.worker_loads_models else None
        runtime = runtime_options(settings, placement) if placement else RuntimeOptions.from_settings(settings)
        # The manifest is followed while the process runs: before each job, and by a watcher thread when idle.
        catalog = LiveCatalog(settings.models_manifest, settings.manifest_check_s, settings)
        # One encoder cache for every model of the process, in front of the tier every worker shares in Redis.
        models = LoadedModels(catalog, runtime, encoder_cache=EncoderCache.from_settings(settings, client))
        if settings.worker_loads_models:  # not in a webhooks-only worker: it runs no model
            models.load_all()  # a model that fails to load is reported, not fatal: its fallback serves
            models.watch(settings.manifest_check_s)
        jobs = JobStore(client, settings.job_ttl_s, on_moved=JobEvents(client))  # moves become webhook events
        storage = open_storage(settings)
        process = cls(settings, client, jobs, storage, models, placement=placement, storage_identity=storage.identity())
        process.heartbeat = Heartbeat(client, settings.worker_heartbeat_s, process.describe)
        process.heartbeat.start()
        return process

    def describe(self) -> dict:
        adapters = self.models.adapters.items()
        # Encoder-cache counters (SAM-family adapters) ride on the heartbeat for operators and tests.
        caches = {name: stats for name, a in adapters if (stats := a.cache_stats()) is not None}
        return {
            **self.models.describe(),
            "embedding_caches": caches,
            "running": sorted(self.running),
            "device": self.placement.describe()["device"] if self.placement else None,
            "storage": self.storage_identity,
        }

    def holds(self, job_id: str) -> bool:
        """Whether this process's run still holds the job (asked before its result is written); Redis away
        is waited for, up to the visibility timeout, as a job's end waits for it."""
        return ride_out(
            lambda: self.jobs.held_by(job_id, self.owner),
            bound_s=self.settings.visibility_timeout_s,
            what=f"job {job_id}: asking whether this run still holds it",
        )

    def begin(self, *job_ids: str) -> None:
        """These jobs run here now: say so in the heartbeat at once."""
        self.running = self.running | set(job_ids)
        self._announce()

    def finish(self, *job_ids: str) -> None:
        """These jobs have left this process (ended, put back, or their outcome could not be written)."""
        self.running = self.running - set(job_ids)
        self._announce()

    def _announce(self) -> None:
        if self.heartbeat is not None:
            try:
                self.heartbeat.beat()
            except redis.RedisError:
                pass  # Redis is away: the heartbeat thread writes it when it is back


_current: WorkerProcess | None = None


def _own_process_group() -> None:
    """Leave the worker's process group, and die with the worker's main process.

    A process manager stops a worker by signalling its whole process group
    (honcho, `make run`'s, does so). The pool processes would get the signal
    too and die mid-job, and the main process's warm shutdown, which lets the
    running job end and be recorded, would have nothing left to wait for. In
    a group of their own they are stopped by their main process instead, and,
    where Linux allows, killed when it dies, so nothing outlives a SIGKILLed worker.
    """
    try:
        os.setpgid(0, 0)
    except OSError:
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def current() -> WorkerProcess:
    """This pool process's state. A process whose start-up failed exits here instead, at its first job.

    Raising would let Celery acknowledge the job as done with its record still queued, and such a
    process would swallow the whole queue that way. Exiting makes Celery put the job back
    (``task_reject_on_worker_lost``) and start a fresh pool process, whose start-up may succeed now.
    """
    if _current is None:
        log.critical(
            "this pool process has no worker state (its start-up failed); exiting so that its job "
            "is redelivered and a fresh process takes its place"
        )
        time.sleep(1)  # a process that keeps failing at start-up does not spin
        os._exit(70)
    return _current


@worker_process_init.connect
def _start_process(**_) -> None:
    global _current
    _own_process_group()
    telemetry.instrument_worker_process()  # OpenTelemetry, when installed and OTEL_EXPORTER_OTLP_ENDPOINT is set
    settings = load_settings()
    try:
        # Redis may be restarting just now (this process replaces one that died): wait for it a while.
        _current = ride_out(
            lambda: WorkerProcess.start(settings), bound_s=START_BOUND_S, what="worker process start-up"
        )
    except Exception:
        log.exception("worker process start-up failed; this process exits at its first job (see current())")
        return
    log.info("worker process ready with models %s", _current.describe()["models"])


@worker_process_shutdown.connect
def _stop_process(**_) -> None:
    metrics.process_ended()
    telemetry.flush()
    if _current:
        _current.models.stop_watching()
    if _current and _current.heartbeat:
        _current.heartbeat.stop()
