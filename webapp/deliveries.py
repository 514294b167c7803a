"""``/v1/jobs/{id}/deliveries``: a job's webhook delivery log, and sending failed deliveries again."""

from __future__ import annotations

import json

from flask import Blueprint, Response, request

from domain.errors import Conflict, InputError
from stores.delivery_log import DeliveryLog
from stores.webhooks import redeliver
from webapp.jobs import load_job
from webapp.services import services

bp = Blueprint("deliveries", __name__)


@bp.get("/v1/jobs/<job_id>/deliveries")
def list_deliveries(job_id: str):
    """Every webhook message of the job with each attempt: time, status code, error."""
    record = load_job(job_id)
    body = {"job_id": record.id, "deliveries": DeliveryLog(services().redis).document(record.id)}
    return Response(json.dumps(body), status=200, mimetype="application/json")


@bp.post("/v1/jobs/<job_id>/deliveries/redeliver")
def redeliver_failed(job_id: str):
    """Queue the job's failed (or 410-disabled) deliveries again; ``{"delivery_id": ...}`` picks one."""
    record = load_job(job_id)
    data = request.get_json(silent=True) if request.get_data() else {}
    if not isinstance(data, dict):
        raise InputError(
            "the body must be a JSON object, or empty", errors=[{"field": "body", "message": "must be an object"}]
        )
    delivery_id = data.get("delivery_id")
    if delivery_id is not None and not isinstance(delivery_id, str):
        raise InputError(
            "delivery_id must be a string", errors=[{"field": "delivery_id", "message": "must be a string"}]
        )
    s = services()
    queued = redeliver(s.redis, record.id, delivery_id, s.celery)
    if not queued:
        which = f"no failed delivery {delivery_id}" if delivery_id else "no failed delivery"
        raise Conflict(f"job {job_id} has {which}; there is nothing to send again")
    return Response(json.dumps({"job_id": record.id, "redelivered": queued}), status=202, mimetype="application/json")
