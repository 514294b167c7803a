"""The result cache's key: what makes two jobs the same, and what does not (pure logic, no Redis)."""

from __future__ import annotations

import pytest

from domain.records import JobRecord
from domain.result_keys import cache_key, file_key
from domain.schemas import parse_request

SHA = "ab" * 32
BASE = {"prompts": {"text": ["price"], "points": [[12, 8, 1]], "boxes": [[1, 2, 30, 40]]}, "outputs": ["rle", "png"]}


def key(body: dict = BASE, *, sha: str = SHA, model: str = "text-regions", version: str = "1", tenant: str = "acme"):
    return cache_key(parse_request(body), image_sha256=sha, model=model, version=version, tenant=tenant)


def test_lane_webhook_deadline_and_model_alias_do_not_change_the_key():
    same = {
        **BASE,
        "lane": "batch",
        "webhook": {"url": "https://example.com/hook"},
        "deadline_s": 5,
        "model": "text-regions",
    }
    assert key(same) == key(BASE)


def test_the_order_and_repeats_of_outputs_do_not_change_the_key():
    assert key({**BASE, "outputs": ["png", "rle", "png"]}) == key(BASE)


def test_numbers_are_compared_as_values_not_as_spelled():
    floats = {**BASE, "prompts": {**BASE["prompts"], "points": [[12.0, 8.0, 1]], "boxes": [[1.0, 2, 30, 40.0]]}}
    assert key(floats) == key(BASE)


@pytest.mark.parametrize(
    "change",
    [
        {"body": {**BASE, "prompts": {**BASE["prompts"], "text": ["PRICE"]}}},
        {"body": {**BASE, "prompts": {**BASE["prompts"], "points": [[12, 8, 0]]}}},
        {"body": {**BASE, "prompts": {"text": ["price"]}}},
        {"body": {**BASE, "outputs": ["rle"]}},
        {"body": {**BASE, "outputs": ["rle", "png", "polygon"]}},
        {"sha": "cd" * 32},
        {"model": "sam-b"},
        {"version": "2"},
        {"tenant": "globex"},
    ],
    ids=[
        "text",
        "point label",
        "fewer prompts",
        "fewer outputs",
        "more outputs",
        "image",
        "model",
        "version",
        "tenant",
    ],
)
def test_anything_that_changes_the_result_changes_the_key(change):
    assert key(**change) != key()


def test_the_key_from_a_stored_record_equals_the_key_at_submit():
    # The worker recomputes the key from the record's JSON request; it must be the web's.
    stored = parse_request(BASE).model_dump(mode="json")
    assert cache_key(stored, image_sha256=SHA, model="text-regions", version="1", tenant="acme") == key()


def record(job_id: str, result_of: str | None = None) -> JobRecord:
    source = result_of or job_id
    return JobRecord(
        id=job_id,
        tenant="acme",
        lane="default",
        model="m",
        image_sha256=SHA,
        width=4,
        height=4,
        input_key=f"tenants/acme/jobs/{source}/input.jpg",
        result_key=f"tenants/acme/jobs/{source}/result.json",
    )


def test_a_hit_shows_the_files_of_the_job_that_ran_and_a_job_its_own():
    own, hit = record("a" * 32), record("b" * 32, result_of="a" * 32)
    for job in (own, hit):
        assert file_key(job, "masks/0.png") == f"tenants/acme/jobs/{'a' * 32}/masks/0.png"
        assert file_key(job, "input.jpg") == f"tenants/acme/jobs/{'a' * 32}/input.jpg"
    assert file_key(hit, "result.json") == f"tenants/acme/jobs/{'b' * 32}/result.json"  # refused by the route
