"""Redis through Sentinel (MASKQ_REDIS_URL=sentinel://…): real Valkey Sentinel processes; a job runs, the
rate limits count in the primary, and after a failover to the replica the service goes on."""

from __future__ import annotations

import subprocess
import time

import pytest
import redis

from runtime.embedded_redis import RedisServer, server_binary
from runtime.redis_connection import connect, limiter_storage, parse_sentinel_url
from tests.conftest import WorkerProcess, authorized_client, free_port, settings_from
from tests.integration.helpers import small_png, submit, wait_for

MASTER = "maskq-primary"


class Sentinel:
    """One ``valkey-server --sentinel`` process watching the primary at ``port``."""

    def __init__(self, folder, primary_port: int):
        self.port = free_port()
        config = folder / f"sentinel-{self.port}.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\nsentinel monitor {MASTER} 127.0.0.1 {primary_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\nsentinel failover-timeout {MASTER} 5000\n"
        )
        self.process = subprocess.Popen(
            [str(server_binary()), str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.client = redis.Redis(port=self.port, socket_timeout=2)
        wait_for(lambda: self._ask(), 10)

    def _ask(self):
        try:
            return self.client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)
        except redis.RedisError:
            return None

    def primary_port(self) -> int:
        return int(self._ask()[1])

    def stop(self):
        self.process.kill()
        self.process.wait(5)


@pytest.fixture
def sentinel_stack(tmp_path, base_env):
    primary = RedisServer(free_port(), tmp_path / "primary").start()
    sentinel = Sentinel(tmp_path, primary.port)
    env = {
        **base_env,
        "MASKQ_REDIS_URL": f"sentinel://127.0.0.1:{sentinel.port}/0",
        "MASKQ_REDIS_SENTINEL_MASTER": MASTER,
        "MASKQ_DATA_DIR": str(tmp_path / "data"),
        "MASKQ_STORAGE_DIR": str(tmp_path / "storage"),
    }
    workers: list[WorkerProcess] = []
    yield primary, sentinel, env, workers
    for worker in workers:
        worker.stop()
    sentinel.stop()
    primary.kill()


def test_the_url_forms():
    assert parse_sentinel_url("sentinel://:s%3Acret@a:26379;sentinel://:s%3Acret@b/3") == (
        [("a", 26379), ("b", 26379)],
        "s:cret",
        3,
    )
    assert limiter_storage("redis://h:1/0") == ("redis://h:1/0", {})
    uri, options = limiter_storage("sentinel://:pw@a:1;sentinel://b:2", "m")
    assert uri == "redis+sentinel://:pw@a:1,b:2/m" and options["sentinel_kwargs"] == {"password": None}
    with pytest.raises(ValueError):
        parse_sentinel_url("sentinel://:pw@")


def test_a_job_runs_and_rate_limits_count_through_sentinel(sentinel_stack):
    primary, _sentinel, env, workers = sentinel_stack
    direct = redis.Redis.from_url(primary.url)
    workers.append(WorkerProcess(env, "sentinel").start(direct))
    from webapp.app import create_app

    app = create_app(settings_from(env))
    client = authorized_client(app)
    job_id = submit(client, small_png(1)).get_json()["id"]
    assert client.get(f"/v1/jobs/{job_id}?wait=30").get_json()["status"] == "succeeded"
    assert direct.exists(f"maskq:job:{job_id}")  # the record is in the primary Sentinel named
    assert app.extensions["maskq.limiter"].limiter.storage.check()  # the limiter reached it too (no fallback)
    assert direct.keys("LIMITS:LIMITER/maskq/*"), direct.keys("*")[:20]  # counted in the primary
    assert connect(env["MASKQ_REDIS_URL"], MASTER).ping()


def test_after_a_failover_to_the_replica_the_service_goes_on(sentinel_stack, tmp_path):
    primary, sentinel, env, workers = sentinel_stack
    replica_port = free_port()
    replica = subprocess.Popen(
        [
            str(server_binary()),
            "--port",
            str(replica_port),
            "--bind",
            "127.0.0.1",
            "--replicaof",
            "127.0.0.1",
            str(primary.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: redis.Redis(port=replica_port).info("replication").get("master_link_status") == "up", 15)
        workers.append(WorkerProcess(env, "sentinel").start(redis.Redis.from_url(primary.url)))
        from webapp.app import create_app

        client = authorized_client(create_app(settings_from(env)))
        before = submit(client, small_png(2)).get_json()["id"]
        assert client.get(f"/v1/jobs/{before}?wait=30").get_json()["status"] == "succeeded"
        wait_for(lambda: redis.Redis(port=replica_port).exists(f"maskq:job:{before}"), 10)
        # Sentinel learns of replicas from the primary's INFO, every 10 s: wait until it knows this one.
        wait_for(lambda: sentinel.client.execute_command("SENTINEL", "replicas", MASTER), 20)
        primary.kill()  # the primary's host dies
        wait_for(lambda: sentinel.primary_port() == replica_port, 30)  # Sentinel promoted the replica
        # The same web app and worker, without a restart: a new job runs on the new primary.
        deadline = time.monotonic() + 60
        while True:
            answer = submit(client, small_png(3))
            if answer.status_code == 202:
                break
            assert answer.status_code == 503 and time.monotonic() < deadline, answer.get_json()
            time.sleep(0.5)
        after = answer.get_json()["id"]
        assert client.get(f"/v1/jobs/{after}?wait=30").get_json()["status"] == "succeeded"
        assert client.get(f"/v1/jobs/{before}").get_json()["status"] == "succeeded"  # replicated before the failover
    finally:
        replica.kill()
        replica.wait(5)


def test_a_primary_without_its_replicas_refuses_writes_as_a_connection_error(tmp_path):
    """min-replicas-to-write (README, Scaling out): the refusal must read as "wait", not as a failure: maskq's
    waits and kombu's reconnect apply (the cluster's "Redis primary partitioned" scenario found the workers
    dying of it, and, without the setting, writes taken by a cut-off primary lost at its demotion)."""
    from runtime.redis_connection import ReplicasLost
    from workers.redis_outage import cut_off

    server = RedisServer(free_port(), tmp_path / "alone").start()
    try:
        client = connect(server.url)
        client.set("before", "1")
        client.config_set("min-replicas-to-write", "1")  # and it has none
        with pytest.raises(redis.ConnectionError) as refused:
            client.set("after", "1")
        assert isinstance(refused.value, ReplicasLost) and cut_off(refused.value)
        assert client.get("before") == b"1" and client.get("after") is None  # reads go on; the write never happened
        from kombu.transport.redis import Transport

        assert isinstance(refused.value, Transport.connection_errors)  # kombu reconnects rather than exits
    finally:
        server.kill()
