"""The Kubernetes Redis, started as its manifest starts it, in the real Valkey (the embedded 8.1 binary).

The StatefulSet's own start script and probe are run by ``sh``, with only the paths changed (the
binary, the config file) and the address pinned to loopback and a free port: the config file loads,
the password arrives on standard input and nowhere on the command line, the probe passes with it,
and the server holds to maxmemory with noeviction.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from runtime.embedded_redis import server_binary
from tests.conftest import free_port
from tests.support.kustomize import render
from tests.unit.test_kubernetes import BASE, kinds, pod

PASSWORD = "0123456789abcdef0123456789abcdef"


def test_the_manifests_redis_starts_with_its_config_and_the_password_off_the_command_line(tmp_path):
    docs = render(BASE)
    config_file = kinds(docs, "ConfigMap")["redis-config"]["data"]["valkey.conf"]
    assert "dir /data\n" in config_file  # the volume, there
    (tmp_path / "valkey.conf").write_text(config_file.replace("dir /data\n", f"dir {tmp_path}\n"))
    container = pod(kinds(docs, "StatefulSet")["redis"])["containers"][0]
    port, binary = free_port(), server_binary()
    overrides = f"{tmp_path / 'valkey.conf'} --bind 127.0.0.1 --port {port} --loglevel warning"
    script = container["args"][0].replace("valkey-server", str(binary)).replace("/etc/valkey/valkey.conf", overrides)
    assert container["command"] == ["sh", "-c"]
    server = subprocess.Popen(["sh", "-c", script], env={"REDIS_PASSWORD": PASSWORD}, start_new_session=True)
    try:
        client = redis.Redis(port=port, password=PASSWORD)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.05)
        assert PASSWORD.encode() not in Path(f"/proc/{server.pid}/cmdline").read_bytes()
        try:
            redis.Redis(port=port).ping()
            raise AssertionError("answered without the password")
        except redis.AuthenticationError:
            pass
        config = client.config_get("*")
        assert config["maxmemory-policy"] == "noeviction" and int(config["maxmemory"]) == 3 * 2**30
        assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
        # The readiness probe, as the kubelet runs it in the container (valkey-cli on the default port there).
        probe = container["readinessProbe"]["exec"]["command"]
        cli = f"{binary.with_name('valkey-cli')} -p {port}"
        assert probe[:2] == ["sh", "-c"]
        ran = subprocess.run(["sh", "-c", probe[2].replace("valkey-cli", cli)], env={"REDIS_PASSWORD": PASSWORD})
        assert ran.returncode == 0
        ran = subprocess.run(["sh", "-c", probe[2].replace("valkey-cli", cli)], env={"REDIS_PASSWORD": "wrong"})
        assert ran.returncode != 0  # the probe really checks
        # Full: writes are refused, nothing is evicted.
        client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) + 200_000))
        client.set("maskq:job:kept", "a record")
        try:
            for i in range(10_000):
                client.set(f"filler:{i}", "x" * 1000)
            raise AssertionError("a full Redis took every write")
        except redis.exceptions.OutOfMemoryError:
            pass
        assert client.get("maskq:job:kept") == b"a record"
    finally:
        server.terminate()
        server.wait(10)
