"""API keys and tenants against the real app, Redis, worker and CLI: who may see and do what."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
import requests

from tests.conftest import ROOT, VENV_BIN, authorized_client, free_port, image_bytes, settings_from
from tests.integration.helpers import run_to_end, submit
from webapp.auth import KEY_CACHE_TTL_S


def assert_problem(answer, status: int) -> dict:
    assert answer.status_code == status, answer.get_data(as_text=True)
    assert answer.mimetype == "application/problem+json"
    body = answer.get_json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def maskq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The real ``maskq`` console script, as an operator runs it."""
    return subprocess.run(
        [str(VENV_BIN / "maskq"), *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_v1_route_without_a_key_or_with_an_unknown_one_is_a_401_problem(settings, redis_client):
    from webapp.app import create_app

    # Every route, four ways, from one address: far over the failed-authentication rate, on purpose.
    app = create_app(settings.model_copy(update={"failed_auth_rate": "10000/minute"}))
    anonymous = app.test_client()
    routes = [
        (rule.rule.replace("<job_id>", "0" * 32).replace("<path:name>", "masks/0.png"), method)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/v1/")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    ]
    assert ("/v1/jobs", "POST") in routes and ("/v1/models", "GET") in routes
    for headers in (
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer mq_not-a-key-anyone-made"},
    ):
        for path, method in routes:
            answer = anonymous.open(path, method=method, headers=headers)
            assert_problem(answer, 401)
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    # What is not under /v1 needs no key.
    for path in ("/healthz", "/openapi.json", "/docs/"):
        assert anonymous.get(path).status_code == 200, path


def test_a_key_made_by_the_cli_works_and_answers_403_once_revoked(app, base_env, redis_client):
    made = maskq(
        base_env, "keys", "create", "--tenant", "acme", "--lane", "batch", "--rate", "100/minute", "--label", "ci"
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert re.fullmatch(r"mq_[A-Za-z0-9_-]{40,}", key)
    # The tenant's webhook secret, for verifying signatures: the one the webhooks sign with.
    from stores.webhooks import tenant_secret

    assert re.search(r"whsec_\S+", made.stderr).group(0) == tenant_secret(redis_client, "acme")
    # Only the hash is stored: the key appears nowhere in Redis.
    for name in redis_client.scan_iter():
        kind = redis_client.type(name)
        values = (
            [redis_client.get(name)]
            if kind == b"string"
            else (list(redis_client.hgetall(name).values()) if kind == b"hash" else [])
        )
        assert all(key.encode() not in (v or b"") for v in values) and key.encode() not in name

    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    assert client.get("/v1/models").status_code == 200

    listed = maskq(base_env, "keys", "list", "--tenant", "acme")
    assert listed.returncode == 0 and key not in listed.stdout
    (line,) = listed.stdout.splitlines()
    key_id = line.split()[0]
    assert "lane=batch" in line and "rate=100/minute" in line and "active" in line

    revoked = maskq(base_env, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    time.sleep(KEY_CACHE_TTL_S)  # how long a web process may still trust the key's record it read
    body = assert_problem(client.get("/v1/models"), 403)
    assert "revoked" in body["detail"]
    assert_problem(submit(client, image_bytes("en.jpg")), 403)
    assert not list(redis_client.scan_iter(match="maskq:job:*"))
    assert "revoked" in maskq(base_env, "keys", "list").stdout


def test_the_cli_refuses_a_bad_policy_with_a_clear_message(base_env):
    for args, words in (
        (["--tenant", "Bad/Name"], "tenant"),
        (["--tenant", "a", "--rate", "lots"], "rate"),
        (["--tenant", "a", "--lane", "interactive", "--max-lane", "batch"], "above"),
    ):
        answer = maskq(base_env, "keys", "create", *args)
        assert answer.returncode != 0 and words in answer.stderr and not answer.stdout.strip()


@pytest.mark.usefixtures("worker")
def test_another_tenants_job_is_a_404_on_every_route_exactly_like_one_that_never_existed(app, redis_client):
    owner = authorized_client(app, "acme")
    stranger = authorized_client(app, "globex")
    job = run_to_end(owner, image_bytes("en.jpg"), {"prompts": {"text": ["Dataset"]}, "outputs": ["png"]})
    assert job["status"] == "succeeded", job
    png = job["result"]["instances"][0]["png_url"].replace("http://localhost", "")
    assert owner.get(png).status_code == 200  # the owner can fetch its mask

    # The storage keys are the tenant's own.
    record = redis_client.hgetall(f"maskq:job:{job['id']}")
    assert record[b"tenant"] == b"acme"
    assert record[b"input_key"].startswith(b"tenants/acme/") and record[b"result_key"].startswith(b"tenants/acme/")

    never = "f" * 32
    paths = {f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}?wait=1", png}
    for rule in app.url_map.iter_rules():  # every route that takes a job id, today's and tomorrow's
        if "<job_id>" in rule.rule:
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                paths.add((method, rule.rule.replace("<job_id>", job["id"]).replace("<path:name>", "masks/0.png")))
    assert any(isinstance(p, tuple) and p[0] == "DELETE" for p in paths), "cancel is a route"
    for entry in sorted(paths, key=str):
        method, path = entry if isinstance(entry, tuple) else ("GET", entry)
        theirs = assert_problem(stranger.open(path, method=method), 404)
        nothing = assert_problem(stranger.open(path.replace(job["id"], never), method=method), 404)
        assert theirs["detail"].replace(job["id"], never) == nothing["detail"], (method, path)
    # The stranger's cancel changed nothing; the owner still sees the job as it was.
    assert owner.get(f"/v1/jobs/{job['id']}").get_json()["status"] == "succeeded"
    assert owner.get(png).status_code == 200


def test_a_lane_above_the_keys_ceiling_is_a_403_and_nothing_is_queued(app, redis_client):
    client = authorized_client(app, "acme", max_lane="default", lane="batch")
    body = assert_problem(submit(client, image_bytes("en.jpg"), {"lane": "interactive"}), 403)
    assert [e["field"] for e in body["errors"]] == ["lane"]
    assert not list(redis_client.scan_iter(match="maskq:job:*"))

    at_ceiling = submit(client, image_bytes("en.jpg"), {"lane": "default"})
    assert at_ceiling.status_code == 202 and at_ceiling.get_json()["lane"] == "default"
    unasked = submit(client, image_bytes("en.jpg"))
    assert unasked.status_code == 202 and unasked.get_json()["lane"] == "batch"  # the key's default lane


def test_auth_off_serves_loopback_as_one_tenant_and_refuses_a_public_address(base_env, redis_client):
    from webapp.app import create_app

    app = create_app(settings_from(base_env, auth="off"))
    anonymous = app.test_client()
    job = submit(anonymous, image_bytes("en.jpg"))
    assert job.status_code == 202
    assert redis_client.hget(f"maskq:job:{job.get_json()['id']}", "tenant") == b"default"

    env = {**os.environ, **base_env, "MASKQ_AUTH": "off", "MASKQ_HOST": "0.0.0.0", "MASKQ_PORT": str(free_port())}
    refused = subprocess.run(
        [str(VENV_BIN / "gunicorn"), "-c", "webapp/gunicorn_conf.py", "webapp.app:create_app()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert "MASKQ_AUTH=off is only allowed on a loopback address" in refused.stdout + refused.stderr


def test_the_web_server_prints_a_development_key_that_works_with_the_readmes_curl(base_env, redis_server, tmp_path):
    """``make run``'s web process on loopback with the embedded Redis: one copy-paste from its output."""
    port = free_port()
    env = {
        **os.environ,
        **base_env,
        "MASKQ_DATA_DIR": str(tmp_path),
        "MASKQ_PORT": str(port),
        "MASKQ_EMBEDDED_REDIS_PORT": str(redis_server.port),
        "MASKQ_WEB_WORKERS": "1",
    }
    del env["MASKQ_REDIS_URL"]  # embedded mode: the test's Redis stands in for the one make run starts
    web = subprocess.Popen(
        [str(VENV_BIN / "gunicorn"), "-c", "webapp/gunicorn_conf.py", "webapp.app:create_app()"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        key, lines = None, []
        deadline = time.monotonic() + 60
        while key is None and time.monotonic() < deadline:
            line = web.stdout.readline()
            lines.append(line)
            found = re.search(r"export MASKQ_API_KEY=(\S+)", line)
            key = found.group(1) if found else None
        assert key, "".join(lines)
        assert (tmp_path / "dev-api-key").read_text().strip() == key
        # The banner is one write: its curl line, then the page's link (the page reads the key from the fragment).
        lines += [web.stdout.readline(), web.stdout.readline()]
        assert lines[-1].split()[-1] == f"http://127.0.0.1:{port}/#key={key}", "".join(lines)
        assert (tmp_path / "dev-api-key").stat().st_mode & 0o777 == 0o600
        url = f"http://127.0.0.1:{port}"
        while True:  # the banner comes from the master; its worker may still be starting
            try:
                answer = requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "".join(lines)
                time.sleep(0.1)
        assert answer.status_code == 200 and answer.json()["models"]
        assert requests.get(f"{url}/v1/models", timeout=5).status_code == 401
    finally:
        os.killpg(web.pid, signal.SIGINT)  # gunicorn's quick shutdown
        web.wait(20)


def test_an_address_that_keeps_failing_to_authenticate_is_refused_but_a_valid_key_from_it_is_not(app):
    guesser = app.test_client()
    guesser.environ_base["REMOTE_ADDR"] = "192.0.2.7"
    answers = [guesser.get("/v1/models", headers={"Authorization": f"Bearer mq_guess{i}"}) for i in range(21)]
    assert [a.status_code for a in answers[:20]] == [401] * 20  # MASKQ_FAILED_AUTH_RATE: 20/minute
    refused = answers[20]
    assert refused.status_code == 429 and refused.mimetype == "application/problem+json"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "failed authentications" in refused.get_json()["detail"]
    # Behind an ingress every client has that one address: a real key from it is still served, at once.
    with_key = authorized_client(app)
    with_key.environ_base["REMOTE_ADDR"] = "192.0.2.7"
    assert with_key.get("/v1/models").status_code == 200
    assert submit(with_key, image_bytes("en.jpg")).status_code == 202
    # ... while the failures from it go on being refused, with or without a key-shaped header.
    for headers in ({"Authorization": "Bearer mq_guess-again"}, {}):
        assert_problem(guesser.get("/v1/models", headers=headers), 429)
    elsewhere = app.test_client()
    elsewhere.environ_base["REMOTE_ADDR"] = "192.0.2.8"
    assert_problem(elsewhere.get("/v1/models", headers={"Authorization": "Bearer mq_guess"}), 401)


def fail_until_refused(client, forwarded_for: str, n: int = 21) -> list[int]:
    """``n`` failed authentications, each with this ``X-Forwarded-For``; their statuses."""
    return [
        client.get(
            "/v1/models", headers={"Authorization": f"Bearer mq_guess{i}", "X-Forwarded-For": forwarded_for}
        ).status_code
        for i in range(n)
    ]


def test_x_forwarded_for_is_ignored_without_trusted_proxies_and_read_one_hop_back_with_one(settings, redis_client):
    from webapp.app import create_app

    # No trusted proxy (the default): the header is the client's to write, so changing it changes nothing.
    direct = create_app(settings).test_client()
    statuses = [
        direct.get(
            "/v1/models", headers={"Authorization": "Bearer mq_guess", "X-Forwarded-For": f"198.51.100.{i}"}
        ).status_code
        for i in range(21)
    ]
    assert statuses == [401] * 20 + [429]

    # One proxy in front (an ingress): its entry, the last, is the client; what the client put before it is not.
    proxied = create_app(settings.model_copy(update={"trusted_proxy_hops": 1})).test_client()
    proxied.environ_base["REMOTE_ADDR"] = "10.0.0.1"  # the ingress, the same for everyone
    assert fail_until_refused(proxied, "198.51.100.1") == [401] * 20 + [429]
    assert fail_until_refused(proxied, "203.0.113.9, 198.51.100.1", 1) == [429]
    assert fail_until_refused(proxied, "198.51.100.2", 1) == [401]  # another client behind the same ingress


def test_a_web_process_reads_a_key_once_per_ttl_and_refuses_it_within_the_ttl_of_its_revocation(app, redis_client):
    from stores.tenants import KeyStore

    client = authorized_client(app, "acme")
    reads = []
    real_get = KeyStore.get

    def counted(self, key_hash):
        reads.append(key_hash)
        return real_get(self, key_hash)

    KeyStore.get = counted
    try:
        for _ in range(5):
            assert client.get("/v1/models").status_code == 200
        assert len(reads) == 1  # the others were served from the process's cache
        KeyStore(redis_client).revoke(client.api_key)
        started = time.monotonic()
        while client.get("/v1/models").status_code == 200:
            assert time.monotonic() - started < KEY_CACHE_TTL_S + 0.5, "the revoked key is still accepted"
            time.sleep(0.05)
        assert_problem(client.get("/v1/models"), 403)
        # An unknown key is never kept: each attempt is read (and counted as a failure) again.
        reads.clear()
        for _ in range(2):
            assert client.get("/v1/models", headers={"Authorization": "Bearer mq_unknown"}).status_code == 401
        assert len(reads) == 2
    finally:
        KeyStore.get = real_get
