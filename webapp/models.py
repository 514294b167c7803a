"""``GET /v1/models``: what this deployment serves and whether a worker has it loaded."""
from __future__ import annotations

from flask import Blueprint, jsonify

from webapp.services import services
from workers.gate import gate_states
from workers.heartbeat import live_workers

bp = Blueprint("models", __name__)


@bp.get("/v1/models")
def list_models():
    s = services()
    loaded: dict[str, set[str]] = {}
    for worker in live_workers(s.redis):
        for name, version in worker.get("models", {}).items():
            loaded.setdefault(name, set()).add(version)
    models = [
        {
            "name": name,
            "version": spec.version,
            "default": name == s.catalog.default,
            "prompt_kinds": sorted(s.catalog.prompt_kinds(name)),
            "loaded": spec.version in loaded.get(name, set()),
        }
        for name, spec in s.catalog.specs.items()
    ]
    return jsonify({"models": models, "gates": gate_states(s.redis)})
