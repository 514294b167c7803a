"""``/v1/jobs``: submit, read (with long-poll) and fetch a job's files."""
from __future__ import annotations

import hashlib
import json
import re
import uuid

from flask import Blueprint, Response, request, url_for

from storage import job_prefix
from tasks.errors import InputError, NotFound
from tasks.images import decode_image
from tasks.records import JobRecord
from tasks.schemas import check_request, parse_request
from webapp.services import services
from webapp.submission import read_submission

bp = Blueprint("jobs", __name__)

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}
DEFAULT_TENANT = "default"


@bp.post("/v1/jobs")
def submit_job():
    s = services()
    settings = s.settings
    data, body = read_submission(request, settings.max_image_bytes)
    job_request = parse_request(body)
    spec = s.catalog.spec(job_request.model)
    image = decode_image(data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
    check_request(
        job_request.model_copy(update={"model": spec.name}), width=image.width, height=image.height,
        prompt_kinds=s.catalog.prompt_kinds(spec.name), max_prompts=settings.max_prompts,
        max_text_chars=settings.max_text_prompt_chars,
    )
    job_id = uuid.uuid4().hex
    lane = job_request.lane or settings.default_lane
    input_key = f"{job_prefix(DEFAULT_TENANT, job_id)}input.{EXTENSIONS[image.format]}"
    record = JobRecord(
        id=job_id, tenant=DEFAULT_TENANT, lane=lane, model=spec.name, model_version=spec.version,
        input_key=input_key, image_sha256=hashlib.sha256(data).hexdigest(),
        width=image.width, height=image.height,
        request=job_request.model_copy(update={"model": spec.name, "lane": lane}).model_dump(mode="json"),
    )
    # Input first, record second, message last: a worker that gets the message finds both.
    s.storage.put(input_key, data, image.media_type)
    s.jobs.create(record)
    s.celery.send_task("maskq.run_job", args=[job_id], queue=lane, task_id=job_id)
    response = _json(record.document(), 202)
    response.headers["Location"] = url_for("jobs.get_job", job_id=job_id)
    return response


@bp.get("/v1/jobs/<job_id>")
def get_job(job_id: str):
    s = services()
    wait = _wait_seconds(s.settings.max_wait_s)
    record = _record(job_id)
    if wait and not record.status.ended:
        record = s.jobs.wait_until_ended(job_id, wait) or record
    return _json(record.document(_result(record)), 200)


@bp.get("/v1/jobs/<job_id>/files/<path:name>")
def get_job_file(job_id: str, name: str):
    record = _record(job_id)
    key = job_prefix(record.tenant, job_id) + name
    if ".." in name or not (name.startswith("masks/") or key == record.input_key):
        raise NotFound("no such file")
    try:
        data = services().storage.get(key)
    except KeyError:
        raise NotFound("no such file") from None
    mimetype = "image/png" if name.endswith(".png") else "application/octet-stream"
    return Response(data, mimetype=mimetype)


def _record(job_id: str) -> JobRecord:
    record = services().jobs.get(job_id) if JOB_ID.match(job_id) else None
    if record is None:
        raise NotFound(f"no job {job_id}")
    return record


def _result(record: JobRecord) -> dict | None:
    if record.result_key is None:
        return None
    s = services()
    result = json.loads(s.storage.get(record.result_key))
    prefix = job_prefix(record.tenant, record.id)
    for instance in result["instances"]:
        key = instance.pop("png_key", None)
        if key:
            instance["png_url"] = s.storage.url(key) or url_for(
                "jobs.get_job_file", job_id=record.id, name=key[len(prefix):], _external=True
            )
    return result


def _wait_seconds(limit: int) -> float:
    raw = request.args.get("wait")
    if raw is None:
        return 0
    try:
        wait = float(raw)
    except ValueError:
        wait = -1
    if not 0 <= wait <= limit:
        raise InputError(f"wait must be a number of seconds from 0 to {limit}",
                         errors=[{"field": "wait", "message": f"must be 0..{limit}"}])
    return wait


def _json(body: dict, status: int) -> Response:
    response = Response(json.dumps(body, ensure_ascii=False), status=status, mimetype="application/json")
    return response
