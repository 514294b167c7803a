"""``GET /metrics``: the service-wide series (from Redis, the same in every web process) and this web
tier's own HTTP series.

- Jobs, result cache, out-of-memory requeues and webhooks: ``stores/job_metrics.py``.
- Lanes and the fleet, read at scrape time: lane depths, live worker processes, each worker's
  resource gate (open, free device memory), and the models loaded or failed across the fleet.
- HTTP requests and their durations, by route and status. Under gunicorn each web process writes
  them to ``PROMETHEUS_MULTIPROC_DIR`` (``webapp/gunicorn_conf.py``) and a scrape of any one of
  them reads all; without it (Flask's own server, the tests) they are this process's.

A worker host's own series (embedding caches, batch sizes, inference time, its GPU) are on that
host's port: ``workers/metrics.py``.
"""

from __future__ import annotations

import os
import time

import redis
from flask import Blueprint, Response, g, request
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

from config.settings import LANES
from domain.keys import lane_index
from stores.fleet import gate_states, live_workers
from stores.job_metrics import LATENCY_BUCKETS, JobMetricsCollector
from webapp.services import services

bp = Blueprint("metrics", __name__)

HTTP_REQUESTS = Counter(
    "maskq_http_requests", "HTTP requests answered, by method, route and status", ["method", "route", "status"]
)
HTTP_SECONDS = Histogram(
    "maskq_http_request_duration_seconds",
    "Time to answer an HTTP request, by route",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
# Any token is a method on the wire: a client inventing them would invent series. Others count as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class FleetCollector:
    """Lane depths and the live workers' heartbeats and gates, read from Redis at scrape time."""

    def __init__(self, client: redis.Redis):
        self.redis = client

    def collect(self):
        depth = GaugeMetricFamily("maskq_lane_depth", "Jobs waiting in each lane", labels=["lane"])
        for lane in LANES:
            depth.add_metric([lane], self.redis.zcard(lane_index(lane)))
        yield depth
        workers = live_workers(self.redis)
        yield GaugeMetricFamily("maskq_workers_ready", "Worker processes with a live heartbeat", value=len(workers))
        loaded = GaugeMetricFamily(
            "maskq_model_loaded_processes",
            "Worker processes that have a model version loaded",
            labels=["model", "version"],
        )
        failed = GaugeMetricFamily(
            "maskq_model_failed_processes", "Worker processes where a model failed to load", labels=["model"]
        )
        counts: dict[tuple[str, str], int] = {}
        failures: dict[str, int] = {}
        for worker in workers:
            for name, version in worker.get("models", {}).items():
                counts[(name, version)] = counts.get((name, version), 0) + 1
            for name in worker.get("model_errors", {}):
                failures[name] = failures.get(name, 0) + 1
        for (name, version), n in sorted(counts.items()):
            loaded.add_metric([name, version], n)
        for name, n in sorted(failures.items()):
            failed.add_metric([name], n)
        yield loaded
        yield failed
        gate_open = GaugeMetricFamily(
            "maskq_worker_gate_open", "1 while the worker takes jobs (its device has room)", labels=["worker", "device"]
        )
        free = GaugeMetricFamily(
            "maskq_worker_device_free_bytes",
            "Free memory on the worker's device (GPU or host)",
            labels=["worker", "device"],
        )
        for worker_id, gate in sorted(gate_states(self.redis).items()):
            gate_open.add_metric([worker_id, gate.get("device", "")], 1.0 if gate.get("open") else 0.0)
            free.add_metric([worker_id, gate.get("device", "")], float(gate.get("free_mb", 0)) * 2**20)
        yield gate_open
        yield free


class _ThisProcess:
    """This process's own series (the default registry), when not under gunicorn's multiprocess mode."""

    def collect(self):
        yield from REGISTRY.collect()


@bp.get("/metrics")
def metrics():
    client = services().redis
    registry = CollectorRegistry()
    registry.register(FleetCollector(client))
    registry.register(JobMetricsCollector(client))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")


def start_timer() -> None:
    g.maskq_started = time.perf_counter()


def count_request(response: Response) -> Response:
    """After every request: its count and duration, under its route's pattern (bounded), never its path.

    Every label is one of a few values the service chose: a known method or ``other``, a route pattern
    or ``unmatched`` (every 404 path, every 405), and a status code the service answered.
    """
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    method = request.method if request.method in KNOWN_METHODS else "other"
    HTTP_REQUESTS.labels(method, route, str(response.status_code)).inc()
    started = g.get("maskq_started")
    if started is not None:
        HTTP_SECONDS.labels(route).observe(time.perf_counter() - started)
    return response
