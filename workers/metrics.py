"""A worker host's own Prometheus series, on a port of its own (``MASKQ_WORKER_METRICS_PORT``).

The service-wide job series live in Redis and are scraped from the web
(``stores/job_metrics.py``); what only a worker knows is here: how long its
model calls take, its embedding cache's hits, the batches it ran, the models
its processes hold, its resource gate, and its GPUs (NVML, read at scrape
time). Celery's pool processes each write their series to a folder of this
worker's (prometheus_client's multiprocess mode); the main process serves
them all on the port. With ``MASKQ_GPUS`` each GPU's worker takes the next
port (``workers/launch.py``).

:func:`prepare` must run before anything imports prometheus_client
(``workers/celery_app.py`` calls it first; Celery's own command line may
have imported it already, which :func:`prepare` undoes).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys

import psutil

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def prepare(settings) -> None:
    """Give this worker (its main process and the pool processes it forks) a fresh series folder."""
    root = settings.data_dir / "metrics"
    for old in root.glob("worker-*"):  # the folders of workers that are gone
        pid = old.name.removeprefix("worker-")
        if not pid.isdigit() or not psutil.pid_exists(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = root / f"worker-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    if "prometheus_client" in sys.modules:
        # Celery's command line imported it already (Flower's plugin does): it chose its value class for
        # a single process then. Choose again; every series of ours is made after this (series()).
        from prometheus_client import values

        values.ValueClass = values.get_value_class()


@functools.cache
def series():
    """The series, made once per process (after :func:`prepare`)."""
    from prometheus_client import Counter, Gauge, Histogram

    from stores.job_metrics import LATENCY_BUCKETS

    class Series:
        inference = Histogram(
            "maskq_worker_inference_seconds",
            "Model time per job (encoder and decoder)",
            ["model"],
            buckets=LATENCY_BUCKETS,
        )
        embeddings = Counter(
            "maskq_worker_embedding_cache_lookups",
            "SAM-family image embeddings: found in "
            "this process (local), in the shared store (shared), or encoded (miss)",
            ["model", "result"],
        )
        batch_size = Histogram(
            "maskq_worker_batch_size", "Jobs per stacked inference call", ["model"], buckets=BATCH_BUCKETS
        )
        models_loaded = Gauge(
            "maskq_worker_models_loaded",
            "Pool processes holding a model version",
            ["model", "version"],
            multiprocess_mode="livesum",
        )
        load_failures = Counter("maskq_worker_model_load_failures", "Model versions that failed to set up", ["model"])
        gate_open = Gauge("maskq_worker_gate_open", "1 while the worker takes jobs", multiprocess_mode="livemax")
        device_free = Gauge(
            "maskq_worker_device_free_bytes", "Free memory on the device the gate watches", multiprocess_mode="livemax"
        )

    return Series


class GpuCollector:
    """Each GPU's utilisation and memory, from NVML at scrape time (nothing where there is no NVML)."""

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception:  # no driver, no library: no GPU series
            return
        util = GaugeMetricFamily(
            "maskq_gpu_utilization_ratio", "GPU busy fraction over NVML's last sample", labels=["gpu", "uuid"]
        )
        used = GaugeMetricFamily("maskq_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu", "uuid"])
        total = GaugeMetricFamily("maskq_gpu_memory_total_bytes", "GPU memory", labels=["gpu", "uuid"])
        for index in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            labels = [str(index), uuid if isinstance(uuid, str) else uuid.decode()]
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            util.add_metric(labels, pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
            used.add_metric(labels, memory.used)
            total.add_metric(labels, memory.total)
        yield util
        yield used
        yield total


def serve(settings) -> None:
    """In the worker's main process: serve every process's series and the GPUs' on the metrics port."""
    if not settings.worker_metrics_port:
        return
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(GpuCollector())
    try:
        start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host, registry=registry)
    except OSError as exc:  # a busy port costs the metrics, never the worker
        log.warning(
            "worker metrics: cannot listen on %s:%d (%s); not served",
            settings.worker_metrics_host,
            settings.worker_metrics_port,
            exc,
        )
        return
    log.info("worker metrics on http://%s:%d/metrics", settings.worker_metrics_host, settings.worker_metrics_port)


def process_ended() -> None:
    """In a pool process that stops: its live gauges go (its counters stay counted)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())
