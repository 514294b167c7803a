"""Rate limits in the real Redis: per key, for everyone, with their headers, and their recovery."""

from __future__ import annotations

import time

from tests.conftest import authorized_client, image_bytes, settings_from
from tests.integration.helpers import submit

HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


def test_a_key_over_its_rate_gets_a_429_problem_with_retry_after_and_recovers_after_the_window(app):
    limited = authorized_client(app, "acme", rate="3 per 2 seconds")
    other = authorized_client(app, "acme")
    remaining = []
    for _ in range(3):
        answer = limited.get("/v1/models")
        assert answer.status_code == 200
        assert answer.headers["X-RateLimit-Limit"] == "3"
        remaining.append(int(answer.headers["X-RateLimit-Remaining"]))
    assert remaining == [2, 1, 0]
    assert "Retry-After" not in answer.headers  # only a refusal says when to come back

    refused = limited.get("/v1/models")
    assert refused.status_code == 429
    assert refused.mimetype == "application/problem+json"
    body = refused.get_json()
    assert body["status"] == 429 and "3 per 2 second" in body["detail"]
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 3
    assert int(refused.headers["X-RateLimit-Reset"]) >= time.time() - 1
    # Every route of the key shares its one budget, and another key has its own.
    assert submit(limited, image_bytes("en.jpg")).status_code == 429
    assert other.get("/v1/models").status_code == 200

    time.sleep(retry_after)  # Retry-After is the promise under test
    again = limited.get("/v1/models")
    assert again.status_code == 200, again.get_json()
    assert again.headers["X-RateLimit-Remaining"] == "2"


def test_the_global_rate_caps_all_keys_together(base_env, redis_client):
    from webapp.app import create_app

    app = create_app(settings_from(base_env, global_rate="4 per 10 seconds", default_rate="100/minute"))
    clients = [authorized_client(app, tenant) for tenant in ("acme", "globex")]
    statuses = [clients[i % 2].get("/v1/models").status_code for i in range(6)]
    assert statuses == [200, 200, 200, 200, 429, 429]
    body = clients[0].get("/v1/models").get_json()
    assert "overall" in body["detail"]


def test_requests_without_a_key_have_their_own_bucket_and_never_spend_the_keys_limits(base_env, redis_client):
    from webapp.app import create_app

    app = create_app(
        settings_from(base_env, global_rate="5/minute", default_rate="5/minute", anonymous_rate="8/minute")
    )
    keyed = authorized_client(app)
    anonymous = app.test_client()
    # The OpenAPI document, the icon, the page's settings, the docs, a path that is nowhere: 8 between them.
    paths = [
        "/openapi.json",
        "/favicon.ico",
        "/ui/config",
        "/docs/",
        "/no-such-page",
        "/openapi.json",
        "/no/such/page/either",
        "/favicon.ico",
    ]
    assert [anonymous.get(p).status_code for p in paths] == [200, 204, 200, 200, 404, 200, 404, 204]
    for path in ("/openapi.json", "/nowhere"):  # a 404 counts as well: it is not a way around the bucket
        refused = anonymous.get(path)
        assert refused.status_code == 429 and refused.mimetype == "application/problem+json", path
        assert "without an API key" in refused.get_json()["detail"] and 1 <= int(refused.headers["Retry-After"]) <= 61
    # None of that spent the service-wide rate (5) or a key's: a key still has all five.
    remaining = [int(keyed.get("/v1/models").headers["X-RateLimit-Remaining"]) for _ in range(5)]
    assert remaining == [4, 3, 2, 1, 0]
    # Another address has a bucket of its own.
    elsewhere = app.test_client()
    elsewhere.environ_base["REMOTE_ADDR"] = "192.0.2.9"
    assert elsewhere.get("/openapi.json").status_code == 200


def test_every_v1_answer_carries_the_rate_headers_and_probes_are_never_limited(base_env, redis_client, client):
    answers = [
        client.get("/v1/models"),
        submit(client, image_bytes("en.jpg")),  # 202
        client.get("/v1/jobs/" + "0" * 32),  # 404
        submit(client, image_bytes("en.jpg"), {"lane": "urgent"}),  # 422
        client.get("/v1/jobs/" + "0" * 32 + "?wait=999"),  # 400
    ]
    assert [a.status_code for a in answers] == [200, 202, 404, 422, 400]
    for answer in answers:
        assert all(name in answer.headers for name in HEADERS), (answer.status_code, dict(answer.headers))
    remaining = [int(a.headers["X-RateLimit-Remaining"]) for a in answers]
    assert remaining == sorted(remaining, reverse=True) and remaining[0] - remaining[-1] == 4

    from webapp.app import create_app

    tight = authorized_client(create_app(settings_from(base_env, default_rate="1 per 10 seconds")))
    assert tight.get("/v1/models").status_code == 200
    assert tight.get("/v1/models").status_code == 429
    for _ in range(5):
        for probe in ("/healthz", "/metrics"):
            answer = tight.get(probe)
            assert answer.status_code == 200 and "X-RateLimit-Limit" not in answer.headers


def test_with_redis_down_the_api_is_a_503_problem_and_the_docs_still_load(isolated):
    client = isolated.client()
    assert client.get("/v1/models").status_code == 200
    isolated.server.kill()
    down = client.get("/v1/models")
    assert down.status_code == 503 and down.mimetype == "application/problem+json"
    assert "Retry-After" in down.headers
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/healthz").status_code == 200
