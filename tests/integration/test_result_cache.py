"""The result cache and the coalescing of identical jobs, with a real Redis, real workers and the real model.

The test environment turns the cache off (most tests mean a second run when
they submit an image again); every app and worker here turns it on.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
import uuid

import pytest

from domain.records import JobRecord
from domain.result_keys import cache_key
from domain.schemas import parse_request
from runtime.embedded_redis import RedisServer
from stores.fleet import live_workers
from stores.jobs import JobStore
from stores.result_cache import INDEX, ResultCache, entry_key, followers_key, inflight_key
from tests.conftest import IsolatedStack, authorized_client, clean_redis, free_port, image_bytes
from tests.integration.helpers import run_to_end, small_png, submit, wait_for
from tests.integration.webhook_receiver import Receiver
from tests.support.slow_models import slow_manifest

ON = {"MASKQ_RESULT_CACHE_ENABLED": "true"}
TTL_S, MAX_ENTRIES = 600, 2
REQUEST = {"prompts": {"text": ["Dataset"]}, "outputs": ["rle", "png"]}
LANES = ("interactive", "default", "batch")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, base_env):
    """A Redis of this module's own and one worker whose jobs take at least half a second (so they can be joined)."""
    folder = tmp_path_factory.mktemp("result-cache")
    server = RedisServer(free_port(), folder / "redis").start()
    env = {
        **base_env,
        **ON,
        "MASKQ_REDIS_URL": server.url,
        "MASKQ_DATA_DIR": str(folder / "data"),
        "MASKQ_STORAGE_DIR": str(folder / "storage"),
        "MASKQ_RESULT_CACHE_TTL_S": str(TTL_S),
        "MASKQ_RESULT_CACHE_MAX_ENTRIES": str(MAX_ENTRIES),
    }
    built = IsolatedStack(server, env)
    built.worker("cache", MASKQ_MODELS_MANIFEST=slow_manifest(folder, delay_s=0.5))
    yield built
    built.close()


@pytest.fixture
def cache(stack):
    clean_redis(stack.redis)
    yield stack
    clean_redis(stack.redis)


def wait_ended(client, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}?wait=5").get_json()
        # A long-poll returns as the job ends; the loop only covers waits longer than one of them.
        if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return job


def wait_status(client, job_id: str, status: str, timeout: float = 30) -> dict:
    def reached() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}").get_json()
        return job if job["status"] == status else None

    return wait_for(reached, timeout)


def model_runs(worker, ids, expected: int = 1, timeout: float = 10) -> int:
    """How many of these (ended) jobs the model ran for, by the worker's own log.

    The log line follows the record's move: wait for ``expected`` lines, then count them all.
    """
    pattern = re.compile(r"job ([0-9a-f]{32}): succeeded with \d+ instances")
    deadline = time.monotonic() + timeout
    while True:
        runs = sum(1 for found in pattern.finditer(worker.log()) if found.group(1) in set(ids))
        if runs >= expected or time.monotonic() > deadline:
            return runs
        time.sleep(0.05)


def wait_cached(redis_client, job_id: str, timeout: float = 10) -> str:
    """The cache entry of an ended job, once its worker wrote it (just after the job's record ended)."""
    entry = entry_key(redis_client.hget(JobStore.key(job_id), "cache_key").decode())
    wait_for(lambda: redis_client.exists(entry), timeout)
    return entry


def attempts(redis_client, job_id: str) -> int:
    return int(redis_client.hget(JobStore.key(job_id), "attempts") or 0)


def masks(job: dict) -> list:
    return [(i["label"], i["bbox"], i["mask"]) for i in job["result"]["instances"]]


def test_a_cache_hit_is_a_200_with_the_result_while_no_worker_runs_at_all(isolated):
    worker = isolated.worker("cache-hit", **ON)
    client = isolated.client(result_cache_enabled=True)
    image = image_bytes("en.jpg")
    first = run_to_end(client, image, REQUEST)
    assert first["status"] == "succeeded" and first["cached"] is False and first["result"]["instances"]
    wait_cached(isolated.redis, first["id"])

    worker.stop()
    assert not worker.alive
    wait_for(lambda: not live_workers(isolated.redis), 10)  # its heartbeat is deleted as it stops

    # Lane, webhook and deadline do not change a result; the output order neither.
    again = {**REQUEST, "outputs": ["png", "rle"], "lane": "interactive", "deadline_s": 30}
    answer = submit(client, image, again)
    assert answer.status_code == 200, answer.get_json()
    hit = answer.get_json()
    assert hit["id"] != first["id"] and answer.headers["Location"] == f"/v1/jobs/{hit['id']}"
    assert hit["status"] == "succeeded" and hit["cached"] is True and hit["lane"] == "interactive"
    assert hit["model"] == first["model"] and masks(hit) == masks(first)
    assert client.get(f"/v1/jobs/{hit['id']}").get_json() == hit
    # Nothing was queued for it, and its files are the first job's.
    messages = [m for lane in LANES for m in isolated.redis.lrange(lane, 0, -1)]
    assert not [m for m in messages if hit["id"].encode() in m]
    assert [isolated.redis.zcard(f"maskq:lane:{lane}") for lane in LANES] == [0, 0, 0]
    assert attempts(isolated.redis, hit["id"]) == 0
    png = client.get(hit["result"]["instances"][0]["png_url"])
    assert png.status_code == 200 and png.data == client.get(first["result"]["instances"][0]["png_url"]).data
    assert client.get(hit["result"]["input_url"]).data == image

    # Another tenant, or other prompts: not the same job, so queued (and no worker will take it).
    other_tenant = authorized_client(client.application, tenant="globex")
    assert submit(other_tenant, image, REQUEST).status_code == 202
    assert submit(client, image, {**REQUEST, "prompts": {"text": ["other"]}}).status_code == 202


def test_identical_submissions_at_the_same_instant_run_the_model_once(cache):
    client = cache.client()
    image = image_bytes("ch_en_num.jpg")
    start = threading.Barrier(6)
    answers: list = []

    def send():
        own = client.application.test_client()
        own.environ_base.update(client.environ_base)
        start.wait(10)
        answers.append(submit(own, image, {"prompts": {"text": ["促销"]}}))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(a.status_code for a in answers) == [202] * 6
    submitted = [a.get_json() for a in answers]
    leaders = [j for j in submitted if "coalesced_with" not in j]
    assert len(leaders) == 1, submitted
    leader = leaders[0]["id"]
    assert all(j["coalesced_with"] == leader for j in submitted if j["id"] != leader)
    # Followers wait in no lane: the lane holds the leader alone (or nothing, once it runs).
    assert cache.redis.zcard("maskq:lane:default") <= 1

    ended = [wait_ended(client, j["id"]) for j in submitted]
    assert all(j["status"] == "succeeded" for j in ended), ended
    assert len({json.dumps(masks(j)) for j in ended}) == 1 and masks(ended[0])
    ids = [j["id"] for j in ended]
    assert model_runs(cache.workers[0], ids) == 1
    assert sorted(attempts(cache.redis, i) for i in ids) == [0, 0, 0, 0, 0, 1]
    assert [j["cached"] for j in ended if j["id"] != leader] == [True] * 5
    assert [j["id"] for j in ended if not j["cached"]] == [leader]


def test_a_follower_can_be_canceled_on_its_own_and_the_others_still_get_the_result(cache):
    client = cache.client()
    image = image_bytes("en.jpg")
    leader = submit(client, image, REQUEST).get_json()
    first, second = (submit(client, image, REQUEST).get_json() for _ in range(2))
    assert first["coalesced_with"] == second["coalesced_with"] == leader["id"]

    canceled = client.delete(f"/v1/jobs/{first['id']}")
    assert canceled.status_code == 200 and canceled.get_json()["status"] == "canceled"
    assert wait_ended(client, leader["id"])["status"] == "succeeded"
    assert wait_ended(client, second["id"])["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{first['id']}").get_json()["status"] == "canceled"
    assert model_runs(cache.workers[0], [leader["id"], first["id"], second["id"]]) == 1


def test_a_canceled_leader_hands_its_place_to_a_follower_which_runs_and_succeeds(cache):
    client = cache.client()
    blocker = submit(client, small_png(1)).get_json()  # keeps the one worker busy
    wait_status(client, blocker["id"], "running")
    image = image_bytes("en.jpg")
    leader = submit(client, image, REQUEST).get_json()
    follower = submit(client, image, REQUEST).get_json()
    assert follower["coalesced_with"] == leader["id"]
    # The follower is not counted in the lane; its position is its leader's.
    assert cache.redis.zcard("maskq:lane:default") == 1
    assert follower["queue_position"] == leader["queue_position"] == 0

    assert client.delete(f"/v1/jobs/{leader['id']}").get_json()["status"] == "canceled"
    ran = wait_ended(client, follower["id"])
    assert ran["status"] == "succeeded" and ran["cached"] is False and "coalesced_with" not in ran
    assert attempts(cache.redis, follower["id"]) == 1
    assert model_runs(cache.workers[0], [leader["id"], follower["id"]]) == 1
    assert wait_ended(client, blocker["id"])["status"] == "succeeded"


def test_a_leader_that_expires_in_its_lane_hands_its_place_to_a_follower(cache):
    client = cache.client()
    blocker = submit(client, small_png(2)).get_json()
    wait_status(client, blocker["id"], "running")
    image = image_bytes("en.jpg")
    leader = submit(client, image, {**REQUEST, "deadline_s": 0.3}).get_json()
    follower = submit(client, image, REQUEST).get_json()  # no deadline: the deadline is not part of the key
    assert follower["coalesced_with"] == leader["id"]

    ran = wait_ended(client, follower["id"])
    assert ran["status"] == "succeeded" and attempts(cache.redis, follower["id"]) == 1
    assert client.get(f"/v1/jobs/{leader['id']}").get_json()["status"] == "expired"
    wait_ended(client, blocker["id"])


def test_a_job_does_not_wait_behind_an_identical_one_in_a_lower_lane(cache):
    client = cache.client()
    blocker = submit(client, small_png(3)).get_json()
    wait_status(client, blocker["id"], "running")
    image = image_bytes("en.jpg")
    batch = submit(client, image, {**REQUEST, "lane": "batch"}).get_json()
    urgent = submit(client, image, {**REQUEST, "lane": "interactive"}).get_json()
    assert "coalesced_with" not in urgent and urgent["queue_position"] == 0
    assert wait_ended(client, urgent["id"])["status"] == "succeeded"
    assert wait_ended(client, batch["id"])["status"] == "succeeded"
    wait_ended(client, blocker["id"])


def test_hits_and_coalesced_jobs_send_their_job_succeeded_webhooks(cache, tmp_path):
    receiver = Receiver(free_port(), tmp_path).start()
    try:
        client = cache.client()
        image = image_bytes("en.jpg")
        hook = {"webhook": {"url": receiver.url}}
        leader = submit(client, image, REQUEST).get_json()
        follower = submit(client, image, {**REQUEST, **hook}).get_json()
        assert follower["coalesced_with"] == leader["id"]
        assert wait_ended(client, follower["id"])["status"] == "succeeded"
        hit = submit(client, image, {**REQUEST, **hook})
        assert hit.status_code == 200
        got = receiver.wait_for(2)
        bodies = {json.loads(r["body"])["id"]: json.loads(r["body"]) for r in got}
        assert set(bodies) == {follower["id"], hit.get_json()["id"]}
        assert all(r["headers"]["maskq-event"] == "job.succeeded" for r in got)
        assert all(b["status"] == "succeeded" and b["cached"] is True and b["result"] for b in bodies.values())
    finally:
        receiver.stop()


def test_an_idempotent_replay_of_a_cache_hit_returns_that_same_hit(cache):
    client = cache.client()
    image = image_bytes("en.jpg")
    first = run_to_end(client, image, REQUEST)
    assert first["status"] == "succeeded"
    wait_cached(cache.redis, first["id"])

    def post():
        data = {"image": (io.BytesIO(image), "photo.jpg"), "request": json.dumps(REQUEST)}
        return client.post(
            "/v1/jobs", data=data, content_type="multipart/form-data", headers={"Idempotency-Key": "hit-1"}
        )

    hit, replay = post(), post()
    assert hit.status_code == replay.status_code == 200
    assert hit.get_json()["cached"] is True and replay.get_json()["id"] == hit.get_json()["id"]
    assert replay.headers["Idempotent-Replayed"] == "true"


def test_the_cache_keeps_the_newest_entries_up_to_its_bound(cache):
    client = cache.client()
    image = image_bytes("en.jpg")
    requests = [{"prompts": {"text": [word]}} for word in ("Dataset", "MovieShots", "with")]
    ids = [submit(client, image, r).get_json()["id"] for r in requests]  # run in this order by the one worker
    assert all(wait_ended(client, i)["status"] == "succeeded" for i in ids)
    entry = wait_cached(cache.redis, ids[2])
    assert cache.redis.zcard(INDEX) == MAX_ENTRIES
    assert TTL_S - 60 < cache.redis.ttl(entry) <= TTL_S  # the worker's setting, not the default

    oldest = entry_key(cache.redis.hget(JobStore.key(ids[0]), "cache_key").decode())
    assert not cache.redis.exists(oldest)  # evicted: the first job's result is no longer served
    assert [submit(client, image, r).status_code for r in requests[1:]] == [200, 200]


def test_an_entry_past_its_ttl_is_a_miss(cache):
    client = cache.client()
    image = image_bytes("en.jpg")
    first = run_to_end(client, image, REQUEST)
    wait_cached(cache.redis, first["id"])
    assert submit(client, image, REQUEST).status_code == 200
    # The same entry written again as a worker with a one-second TTL writes it.
    short = ResultCache(cache.jobs(), cache.settings(result_cache_ttl_s=1))
    assert short.remember(cache.jobs().get(first["id"]))
    entry = wait_cached(cache.redis, first["id"])
    assert 0 < cache.redis.pttl(entry) <= 1000
    wait_for(lambda: not cache.redis.exists(entry), 10)  # Redis expires it
    expired = submit(client, image, REQUEST)
    assert expired.status_code == 202
    client.delete(f"/v1/jobs/{expired.get_json()['id']}")


def test_a_leader_that_died_unsettled_is_taken_over_with_its_followers_by_the_next_identical_job(cache):
    client = cache.client()
    image = image_bytes("en.jpg")
    spec = client.application.extensions["maskq"].catalog.current().spec(None)
    digest = cache_key(
        parse_request(REQUEST),
        image_sha256=hashlib.sha256(image).hexdigest(),
        model=spec.name,
        version=spec.version,
        tenant="default",
    )
    # What a worker that died between ending its job and settling it leaves: a failed leader still in
    # flight, and a follower waiting on it.
    jobs = cache.jobs()
    dead, waiting = uuid.uuid4().hex, uuid.uuid4().hex
    for job_id in (dead, waiting):
        jobs.create(
            JobRecord(
                id=job_id,
                tenant="default",
                lane="default",
                model=spec.name,
                input_key="",
                image_sha256="",
                width=1,
                height=1,
                request=REQUEST,
                cache_key=digest,
            )
        )
    jobs.fail(dead, "internal", "the worker died")
    cache.redis.hset(JobStore.key(waiting), "coalesced_with", dead)
    cache.redis.zrem("maskq:lane:default", waiting)
    cache.redis.set(inflight_key(digest), dead)
    cache.redis.rpush(followers_key(dead), waiting)

    fresh = submit(client, image, REQUEST).get_json()
    assert "coalesced_with" not in fresh  # it leads
    assert wait_ended(client, fresh["id"])["status"] == "succeeded"
    adopted = wait_ended(client, waiting)
    assert adopted["status"] == "succeeded" and adopted["coalesced_with"] == fresh["id"]
    assert masks(adopted) == masks(client.get(f"/v1/jobs/{fresh['id']}").get_json())
