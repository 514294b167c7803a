"""Liveness, readiness and Prometheus metrics."""
from __future__ import annotations

import redis
from flask import Blueprint, Response, jsonify
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from config.settings import LANES
from domain.errors import MaskqError
from domain.fleet import gate_states, live_workers
from domain.keys import lane_index
from webapp.services import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    s = services()
    checks: dict[str, str] = {}
    workers: list[dict] = []
    try:
        s.redis.ping()
        checks["redis"] = "ok"
        workers = live_workers(s.redis)
        checks["workers"] = f"{len(workers)} ready" if workers else "none ready"
    except redis.RedisError as exc:
        checks["redis"] = f"unreachable: {exc}"
        checks["workers"] = "unknown"
    try:
        s.storage.check()
        checks["storage"] = "ok"
    except MaskqError as exc:
        checks["storage"] = f"unavailable: {exc.detail}"
    ready = checks["redis"] == "ok" and checks["storage"] == "ok" and bool(workers)
    try:
        gates = gate_states(s.redis)
    except redis.RedisError:
        gates = {}
    body = {"status": "ready" if ready else "not ready", "checks": checks, "workers": workers, "gates": gates}
    return jsonify(body), (200 if ready else 503)


class QueueCollector:
    """Reads lane depths and live workers from Redis at scrape time, so every web process reports the same."""

    def __init__(self, client: redis.Redis):
        self.redis = client

    def collect(self):
        depth = GaugeMetricFamily("maskq_lane_depth", "Jobs waiting in each lane", labels=["lane"])
        for lane in LANES:
            depth.add_metric([lane], self.redis.zcard(lane_index(lane)))
        yield depth
        yield GaugeMetricFamily("maskq_workers_ready", "Worker processes with a live heartbeat",
                                value=len(live_workers(self.redis)))


@bp.get("/metrics")
def metrics():
    registry = CollectorRegistry()
    registry.register(QueueCollector(services().redis))
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")
