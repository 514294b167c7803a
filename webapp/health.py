"""Liveness and readiness (Prometheus metrics: webapp/metrics.py)."""

from __future__ import annotations

import logging

import redis
from flask import Blueprint, jsonify

from domain.errors import Forbidden, MaskqError
from stores.fleet import gate_states, live_workers
from webapp.auth import current_key
from webapp.services import services

bp = Blueprint("health", __name__)
log = logging.getLogger(__name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """The public probe: ready or not, and which part is not. No names, paths or error texts."""
    checks, _ = _checks()
    ready = (
        all(value == "ok" for key, value in checks.items() if key != "workers") and checks["workers"] != "none ready"
    )
    return jsonify({"status": "ready" if ready else "not ready", "checks": checks}), (200 if ready else 503)


@bp.get("/v1/admin/status")
def admin_status():
    """What an operator needs behind the probe: each worker's heartbeat, the gates, the error texts (admin keys)."""
    if not current_key().admin:
        raise Forbidden("this needs an admin API key (`maskq keys create --admin`)")
    checks, detail = _checks(detailed=True)
    s = services()
    try:
        workers, gates = live_workers(s.redis), gate_states(s.redis)
    except redis.RedisError:
        workers, gates = [], {}
    return jsonify({"checks": checks, "detail": detail, "workers": workers, "gates": gates})


def _checks(detailed: bool = False) -> tuple[dict[str, str], dict[str, str]]:
    """``(checks, why)``: each part ``ok`` or what is wrong in a word; the error texts apart."""
    s = services()
    checks: dict[str, str] = {}
    why: dict[str, str] = {}
    workers: list[dict] = []
    try:
        s.redis.ping()
        checks["redis"] = "ok"
        workers = live_workers(s.redis)
        checks["workers"] = f"{len(workers)} ready" if workers else "none ready"
    except redis.RedisError as exc:
        checks["redis"], checks["workers"] = "unreachable", "unknown"
        why["redis"] = str(exc)
    try:
        s.storage.check()
        checks["storage"] = "ok"
        mine = s.storage.identity()
        # Live workers on another store (a local folder on another host, another bucket) would miss inputs.
        elsewhere = {w["id"] for w in workers if w.get("storage") and w["storage"] != mine}
        if elsewhere:
            checks["storage"] = "not shared"
            why["storage"] = (
                f"{len(elsewhere)} worker process(es) write to another store than this web process "
                f"({mine}): {', '.join(sorted(elsewhere)[:5])}. More than one host "
                "needs S3 (MASKQ_S3_BUCKET) or one folder every host mounts"
            )
            log.error("storage: %s", why["storage"])
    except MaskqError as exc:
        checks["storage"] = "unavailable"
        why["storage"] = exc.detail
    return checks, why
