"""One home for each name and each conversion: task and queue names written once, a record read back by its types."""

from __future__ import annotations

import ast
import dataclasses
import io
import tokenize
import typing

import pytest

from config import task_names
from domain import schemas
from domain.records import JobRecord, JobState, _converter
from domain.schemas import JobRequest
from tests.conftest import ROOT

# The service's packages: every place that sends, runs, routes or recognises a task (the tests name them freely).
SERVICE_PACKAGES = (
    "config",
    "runtime",
    "domain",
    "stores",
    "storage",
    "models",
    "workers",
    "tasks",
    "webapp",
    "cli",
    "maskq",
)
NAMES = (task_names.RUN_JOB, task_names.DELIVER_WEBHOOK, task_names.APPLY_RETENTION, task_names.WEBHOOK_QUEUE)


def literals_naming(name: str) -> list[str]:
    """Where ``name`` is written as a string literal, or quoted inside one (a Lua script's ``'maskq.run_job'``)."""
    found = []
    for package in SERVICE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
                if token.type != tokenize.STRING:
                    continue
                try:
                    value = ast.literal_eval(token.string)
                except ValueError:  # an f-string: its text as written
                    value = token.string
                if isinstance(value, str) and (value == name or f"'{name}'" in value or f'"{name}"' in value):
                    found.append(f"{path.relative_to(ROOT)}:{token.start[0]}")
    return found


@pytest.mark.parametrize("name", NAMES)
def test_every_task_and_queue_name_is_written_once_in_the_code(name):
    assert literals_naming(name) == [f"config/task_names.py:{literal_line(name)}"]


def literal_line(name: str) -> int:
    source = (ROOT / "config" / "task_names.py").read_text().splitlines()
    return next(i for i, line in enumerate(source, 1) if f'"{name}"' in line)


def test_the_lanes_a_request_may_name_are_the_lane_queues():
    assert typing.get_args(schemas.Lane) == task_names.LANES


def test_a_record_read_back_from_its_hash_has_every_field_in_its_declared_type():
    record = JobRecord(
        id="a" * 32,
        tenant="acme",
        lane="batch",
        model="sam",
        input_key="k/input.png",
        image_sha256="ab" * 32,
        width=640,
        height=480,
        request=JobRequest.model_validate({"prompts": {"points": [[1, 2, 1]]}}),
        status=JobState.SUCCEEDED,
        model_version="0.2.0",
        created_at=1.5,
        started_at=2.25,
        finished_at=3.0,
        result_key="k/result.json",
        instances=2,
        error={"code": "x", "message": "y"},
        attempts=1,
        cached=True,
        deadline_at=9.5,
        last_error={"code": "oom"},
        model_used={"name": "t", "version": "1", "reason": "r"},
        cache_key="c",
        coalesced_with="b" * 32,
        worker="host:1",
        requeued_at=2.0,
        timings={"predict": 0.5},
        traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01",
        batch="d" * 32,
        cancel_at=60.0,
        moves=3,
        media="image",
    )
    raw = {k.encode(): v.encode() for k, v in record.to_hash().items()}
    back = JobRecord.from_hash(raw)
    assert back == record
    hints = typing.get_type_hints(JobRecord)
    for field in dataclasses.fields(JobRecord):
        declared = typing.get_args(hints[field.name]) or (hints[field.name],)  # X | None: (X, NoneType)
        assert isinstance(getattr(back, field.name), tuple(typing.get_origin(t) or t for t in declared)), field.name
    assert type(back.status) is JobState and back.cached is True and type(back.width) is int


def test_a_field_whose_type_has_no_stored_form_is_refused():
    with pytest.raises(TypeError, match="no way to read"):
        _converter("tags", list[str])
