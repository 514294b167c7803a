"""What a deployment exposes: compose publishes nothing unauthenticated, images carry no secrets, Redis is closed."""

from __future__ import annotations

import yaml

from tests.conftest import ROOT


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_publishes_flower_only_on_this_host_and_behind_basic_auth():
    flower = compose()["services"]["flower"]
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])
    assert any(arg.startswith("--basic-auth=${MASKQ_FLOWER_BASIC_AUTH:?") for arg in flower["command"])


def test_compose_redis_needs_a_password_and_every_process_sends_it():
    services = compose()["services"]
    # Compose refuses to start without the password; valkey-server reads it on stdin (tests/unit/test_compose.py).
    assert services["redis"]["environment"]["MASKQ_REDIS_PASSWORD"].startswith("${MASKQ_REDIS_PASSWORD:?")
    assert "requirepass $$MASKQ_REDIS_PASSWORD" in " ".join(services["redis"]["command"])
    url = compose()["x-maskq"]["environment"]["MASKQ_REDIS_URL"]
    assert url.startswith("redis://:${MASKQ_REDIS_PASSWORD:?") and url.endswith("@redis:6379/0")
    assert "ports" not in services["redis"]  # not published at all


def test_compose_runs_webhooks_on_a_worker_of_their_own():
    services = compose()["services"]
    lanes = services["worker"]["command"][services["worker"]["command"].index("-Q") + 1]
    hooks = services["webhooks"]["command"][services["webhooks"]["command"].index("-Q") + 1]
    assert lanes == "interactive,default,batch" and hooks == "webhooks"
    assert services["webhooks"]["environment"]["MASKQ_WORKER_LOADS_MODELS"] == "false"


def test_an_image_built_from_a_checkout_leaves_out_keys_data_and_environments():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {"var/", ".venv/", ".git/"} <= ignored  # var/ holds the dev key, the AOF (webhook secrets), uploads


def test_the_embedded_redis_runs_in_protected_mode(redis_client):
    assert redis_client.config_get("protected-mode")["protected-mode"] == "yes"
