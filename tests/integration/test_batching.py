"""Dynamic batching with real workers: one batch per model and lane, lane order, isolation, no loss."""

from __future__ import annotations

import os
import signal
from collections import defaultdict

import numpy as np
import pytest

from storage.local import LocalStorage
from stores.jobs import JobStore
from tests.conftest import image_bytes
from tests.integration.helpers import small_png, status, submit, wait_for
from tests.support.slow_models import BATCHING, slow_manifest
from workers.batching import OWNERS, Claims, claims_key

ADAPTER = "models.adapters.text_regions:TextRegionsAdapter"
MODELS = ("text-regions", "other")


def batching_manifest(folder, batch_delay_s: float = 0):
    """Two models on the bundled detector, declared to batch, each taking up to 4 jobs per batch."""
    return slow_manifest(folder, adapter=BATCHING, max_batch_size=4, names=MODELS, batch_delay_s=batch_delay_s)


@pytest.fixture
def manifest(tmp_path):
    return batching_manifest(tmp_path)


def batch_of(isolated, job_id: str) -> tuple[str | None, int | None]:
    """``(batch id, batch size)`` the worker wrote on the job's record; ``(None, None)`` if it ran alone."""
    raw = isolated.redis.hmget(JobStore.key(job_id), "batch_id", "batch_size")
    return (raw[0].decode(), int(raw[1])) if raw[0] else (None, None)


def queue(client, count: int, first_seed: int = 0, **request) -> list[str]:
    # Distinct images: identical jobs would be coalesced by the result cache and never reach a worker.
    return [submit(client, small_png(first_seed + i), request or None).get_json()["id"] for i in range(count)]


def wait_all(client, ids: list[str]) -> list[dict]:
    return [client.get(f"/v1/jobs/{job_id}?wait=30").get_json() for job_id in ids]


def no_claims_left(isolated) -> bool:
    return not isolated.redis.exists(OWNERS) and not list(isolated.redis.scan_iter(match="maskq:claimed:*"))


def test_queued_jobs_of_a_batching_model_run_as_one_batch_and_each_gets_its_own_result(isolated, manifest):
    client = isolated.client(models_manifest=manifest)
    ids = queue(client, 4)
    isolated.worker(MASKQ_MODELS_MANIFEST=manifest)
    jobs = wait_all(client, ids)
    assert [j["status"] for j in jobs] == ["succeeded"] * 4
    batches = {batch_of(isolated, job_id) for job_id in ids}
    assert len(batches) == 1 and next(iter(batches))[1] == 4
    records = [isolated.jobs().get(job_id) for job_id in ids]
    assert len({r.result_key for r in records}) == 4
    assert all(r.result_key.startswith(f"tenants/default/jobs/{r.id}/") and r.attempts == 1 for r in records)
    assert no_claims_left(isolated)


def test_with_batching_off_the_same_jobs_run_one_at_a_time(isolated, manifest):
    client = isolated.client(models_manifest=manifest)
    ids = queue(client, 3)
    isolated.worker(MASKQ_MODELS_MANIFEST=manifest, MASKQ_BATCHING="false")
    assert [j["status"] for j in wait_all(client, ids)] == ["succeeded"] * 3
    assert {batch_of(isolated, job_id) for job_id in ids} == {(None, None)}


def test_a_batch_takes_only_its_own_models_jobs_from_its_own_lane_in_lane_order(isolated, manifest):
    client = isolated.client(models_manifest=manifest)
    default = [
        submit(client, small_png(i), {"model": ("text-regions", "other")[i % 2]}).get_json()["id"] for i in range(6)
    ]
    low = queue(client, 2, first_seed=100, lane="batch")
    isolated.worker(MASKQ_MODELS_MANIFEST=manifest)
    assert all(j["status"] == "succeeded" for j in wait_all(client, default + low))
    jobs = isolated.jobs()
    groups = defaultdict(list)
    for job_id in default + low:
        record = jobs.get(job_id)
        groups[batch_of(isolated, job_id)[0]].append((record.lane, record.model, job_id))
    assert None not in groups  # every job ran in a batch
    # One batch per model in the default lane (the other model's jobs between them were skipped,
    # not taken), then one of the batch lane: never a batch of mixed models or lanes.
    assert sorted((members[0][0], members[0][1], len(members)) for members in groups.values()) == [
        ("batch", "text-regions", 2),
        ("default", "other", 3),
        ("default", "text-regions", 3),
    ]
    assert all(len({(lane, model) for lane, model, _ in members}) == 1 for members in groups.values())
    last_default = max(jobs.get(job_id).started_at for job_id in default)
    assert all(jobs.get(job_id).started_at > last_default for job_id in low)


def test_a_job_waiting_in_a_higher_lane_stops_a_batch_forming(isolated, manifest):
    client = isolated.client(models_manifest=manifest)
    ids = queue(client, 4)
    # As if a worker had just taken ids[0], and an interactive job arrived before it looked for company.
    urgent = submit(client, small_png(99), {"lane": "interactive"}).get_json()["id"]
    claims = Claims(isolated.redis, "test-host:1")
    assert claims.take("default", "text-regions", 3, skip=ids[0]) == ([], True)
    assert not isolated.redis.exists(claims_key("test-host:1"))  # nothing taken: the lanes are as they were
    isolated.worker(MASKQ_MODELS_MANIFEST=manifest)
    assert all(j["status"] == "succeeded" for j in wait_all(client, [urgent, *ids]))
    jobs = isolated.jobs()
    assert all(jobs.get(urgent).started_at < jobs.get(job_id).started_at for job_id in ids)
    assert batch_of(isolated, urgent) == (None, None)  # alone: no other job of its lane to take along
    assert len({batch_of(isolated, job_id) for job_id in ids}) == 1  # the default lane's, batched after it


def test_a_model_that_does_not_stack_batches_runs_its_jobs_one_by_one(isolated, tmp_path):
    plain = slow_manifest(tmp_path, max_batch_size=4)  # max_batch_size alone does not make a model batch
    client = isolated.client(models_manifest=plain)
    ids = queue(client, 3)
    isolated.worker(MASKQ_MODELS_MANIFEST=plain)
    assert [j["status"] for j in wait_all(client, ids)] == ["succeeded"] * 3
    assert {batch_of(isolated, job_id) for job_id in ids} == {(None, None)}
    assert no_claims_left(isolated)


def test_a_bad_input_in_a_batch_fails_only_its_own_job(isolated, manifest):
    client = isolated.client(models_manifest=manifest)
    ids = queue(client, 4)
    storage = LocalStorage(isolated.env["MASKQ_STORAGE_DIR"])
    jobs = isolated.jobs()
    for bad in (ids[0], ids[2]):  # the job run_job took, and one taken along
        storage.put(jobs.get(bad).input_key, b"not an image any more")
    isolated.worker(MASKQ_MODELS_MANIFEST=manifest)
    outcome = wait_all(client, ids)
    assert [j["status"] for j in outcome] == ["failed", "succeeded", "failed", "succeeded"]
    assert [outcome[i]["error"]["code"] for i in (0, 2)] == ["input", "input"]
    assert len({batch_of(isolated, job_id) for job_id in ids}) == 1  # they did share one batch
    assert no_claims_left(isolated)


def test_a_batch_whose_pool_process_is_sigkilled_loses_no_job_and_runs_none_twice(isolated, tmp_path):
    manifest = batching_manifest(tmp_path, batch_delay_s=2.5)
    client = isolated.client(models_manifest=manifest)
    ids = queue(client, 4)
    pubsub = isolated.redis.pubsub()
    pubsub.subscribe(*(JobStore.channel(job_id) for job_id in ids))
    # Each batch sleeps 2.5 s with its jobs taken along: time to see them all running, and to kill it.
    worker = isolated.worker(MASKQ_MODELS_MANIFEST=manifest, MASKQ_SCHEDULER_TICK_S=0.2)
    jobs = isolated.jobs()
    wait_for(lambda: all(status(jobs, job_id) == "running" for job_id in ids), 20)
    [child] = worker.children()
    [owner] = [o.decode() for o in isolated.redis.smembers(OWNERS)]
    assert owner.endswith(f":{child}")
    assert sorted(k.decode() for k in isolated.redis.hkeys(claims_key(owner))) == sorted(ids[1:])
    os.kill(child, signal.SIGKILL)  # mid-batch: the three jobs taken along exist only in the claim
    assert [j["status"] for j in wait_all(client, ids)] == ["succeeded"] * 4
    assert worker.alive
    storage = LocalStorage(isolated.env["MASKQ_STORAGE_DIR"])
    events = defaultdict(list)
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        if message["type"] == "message":
            events[message["channel"].decode()].append(message["data"].decode())
    for job_id in ids:
        record = jobs.get(job_id)
        assert record.attempts == 2  # the killed run and the one that finished
        assert events[JobStore.channel(job_id)].count("succeeded") == 1
        assert sorted(k.rsplit("/", 1)[1] for k in storage.list(f"tenants/default/jobs/{job_id}/")) == [
            "input.png",
            "result.json",
        ]
    assert all(jobs.get(job_id).last_error["code"] == "worker_lost" for job_id in ids[1:])
    assert no_claims_left(isolated)


def test_a_batch_over_its_soft_time_limit_fails_the_first_job_and_puts_the_rest_back(isolated, tmp_path):
    # A batch sleeps 4 s: the 3 s limit strikes mid-batch. The job taken along goes back to its
    # lane and then runs alone (no sleep for one job), in time.
    manifest = batching_manifest(tmp_path, batch_delay_s=4)
    limits = {"job_soft_time_limit_s": 3, "job_hard_time_limit_s": 6, "storage_retry_bound_s": 1}
    client = isolated.client(models_manifest=manifest, **limits)
    first, second = queue(client, 2)
    isolated.worker(MASKQ_MODELS_MANIFEST=manifest)
    one, two = wait_all(client, [first, second])
    assert one["status"] == "failed" and one["error"]["code"] == "timeout"
    assert two["status"] == "succeeded"
    record = isolated.jobs().get(second)
    assert record.attempts == 2 and record.last_error["code"] == "batch_interrupted"
    assert no_claims_left(isolated)


def test_a_jobs_result_does_not_depend_on_the_jobs_batched_with_it():
    from domain.images import decode_image
    from models.adapters.base import AdapterContext, ModelSpec, RuntimeOptions, SegmentRequest
    from models.adapters.text_regions import TextRegionsAdapter

    adapter = TextRegionsAdapter(ModelSpec(name="text-regions", version="1", adapter=ADAPTER))
    adapter.setup(AdapterContext(RuntimeOptions(intra_op_threads=2)))
    requests = [
        SegmentRequest(image=decode_image(image_bytes(name), max_bytes=10**8, max_pixels=10**8).pixels)
        for name in ("ch_en_num.jpg", "en.jpg", "latin.jpg")
    ]
    together = adapter.segment(requests)
    for request, batched in zip(requests, together):
        [alone] = adapter.segment([request])
        assert [(i.label, i.score) for i in batched] == [(i.label, i.score) for i in alone]
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(batched, alone))
        assert len(batched) == len(alone) > 0
