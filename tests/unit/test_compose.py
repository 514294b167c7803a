"""docker-compose.yml, parsed: health checks that say what compose reads, and no password on a command line."""

from __future__ import annotations

import yaml

from tests.conftest import ROOT
from tests.support.command_lines import leaks

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
# The compose specification's healthcheck fields.
HEALTHCHECK_FIELDS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}


def test_every_healthcheck_holds_only_healthcheck_fields():
    checks = {name: s["healthcheck"] for name, s in SERVICES.items() if "healthcheck" in s}
    assert checks
    for name, check in checks.items():
        assert set(check) <= HEALTHCHECK_FIELDS, name


def test_redis_is_checked_every_five_seconds_ten_times_before_it_counts_as_unhealthy():
    check, environment = SERVICES["redis"]["healthcheck"], SERVICES["redis"]["environment"]
    assert check["interval"] == "5s" and check["retries"] == 10
    assert set(environment) == {"MASKQ_REDIS_PASSWORD"}  # not "interval" and "retries" as variables


def test_the_redis_password_is_on_no_command_line_and_nothing_is_evicted():
    redis = SERVICES["redis"]
    secrets = {"MASKQ_REDIS_PASSWORD"}
    # Compose reads $$ as a literal $: the container's shell sees $MASKQ_REDIS_PASSWORD.
    for words in (redis["command"], redis["healthcheck"]["test"]):
        words = [w.replace("$$", "$") for w in words]
        assert not leaks(words, secrets), words
        assert not any("${MASKQ_REDIS_PASSWORD" in w for w in words)  # compose would put the value there
    assert "--maxmemory-policy noeviction" in " ".join(redis["command"])
