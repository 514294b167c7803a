"""``GET /v1/models``: what this deployment serves and whether a worker has it loaded."""

from __future__ import annotations

from flask import Blueprint, jsonify

from models.catalog import describe_models
from stores.fleet import gate_states, live_workers
from webapp.services import services

bp = Blueprint("models", __name__)


@bp.get("/v1/models")
def list_models():
    s = services()
    catalog = s.catalog.current()
    body: dict[str, object] = {
        "models": describe_models(catalog, live_workers(s.redis)),
        "default": catalog.default,
        "routes": catalog.routes,
        "gates": gate_states(s.redis),
    }
    if getattr(s.catalog, "error", None):
        body["manifest_error"] = s.catalog.error  # a changed manifest that was refused; the last good one serves
    return jsonify(body)
