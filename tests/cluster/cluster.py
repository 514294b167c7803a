"""The service on many hosts: web, Redis with Sentinel, two worker hosts, S3 and a client, each a namespace.

``Cluster(folder).start()`` builds the hosts (``tests/cluster/network.py``)
and starts, configured as the README's "Scaling out" says:

- ``redis-1``: the Valkey primary (AOF) and a Sentinel; ``redis-2`` and
  ``redis-3``: a replica and a Sentinel each (quorum 2 of 3); every data node
  with ``min-replicas-to-write 1``, as the README asks of Sentinel deployments;
- ``s3``: the S3-compatible test server (moto, durable across restarts), and
  the proxy the web host reaches it through (``tests/cluster/proxy.py``);
- ``web``: gunicorn as the Procfile runs it, and the webhooks worker;
- ``worker-1``, ``worker-2``: the Procfile's inference worker each, on a
  slowed real model (``options.delay_s``) so a fault can land mid-job;
- ``client``: the webhook receiver; the load (``tests/cluster/load.py``) runs
  here too.

Every service process reaches Redis only through the Sentinels
(``MASKQ_REDIS_URL=sentinel://…``) and storage only through S3. Worker logs
are JSON lines (the history checker reads the runs from them).
:meth:`Cluster.close` ends every process and deletes every namespace, also
when start-up failed half-way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.cluster.network import SUBNET, Host, Network

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(Path(sys.executable))
MASTER = "mymaster"
BUCKET = "maskq-cluster"
HOSTS = ("redis-1", "redis-2", "redis-3", "s3", "web", "worker-1", "worker-2", "client")
DATA_HOSTS = ("redis-1", "redis-2", "redis-3")  # Valkey: the primary first, then its replicas
REDIS_PORT, SENTINEL_PORT, S3_PORT, S3_PROXY_PORT, WEB_PORT, RECEIVER_PORT = 6379, 26379, 9000, 9001, 8000, 8099


@dataclass
class Process:
    """One service process: where it runs and how it starts (again, after its host was killed)."""

    name: str
    host: Host
    argv: list[str]
    env: dict[str, str]
    popen: subprocess.Popen | None = None


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {n.strip(): c.strip() for n, _, c in (line.partition(":") for line in lines if line.strip())}


class Cluster:
    """The hosts and their processes; ``env`` overrides the service's ``MASKQ_*`` settings."""

    def __init__(
        self, folder: Path, delay_s: float = 1.0, env: dict[str, str] | None = None, broken_fencing: bool = False
    ):
        self.broken_fencing = broken_fencing
        self.folder = Path(folder)
        self.logs = self.folder / "logs"
        self.delay_s = delay_s
        self.overrides = env or {}
        self.network: Network | None = None
        self.processes: dict[str, Process] = {}
        self.api_key = ""

    # -- addresses -------------------------------------------------------------------------------

    def address(self, host: str) -> str:
        assert self.network is not None
        return self.network.hosts[host].address

    @property
    def base_url(self) -> str:
        return f"http://{self.address('web')}:{WEB_PORT}"

    @property
    def receiver_url(self) -> str:
        return f"http://{self.address('client')}:{RECEIVER_PORT}/hooks/maskq"

    def service_env(self) -> dict[str, str]:
        from tests.support.slow_models import slow_manifest

        manifest = slow_manifest(self.folder, self.delay_s)
        sentinels = ";".join(f"sentinel://{self.address(h)}:{SENTINEL_PORT}" for h in ("redis-1", "redis-2", "redis-3"))
        s3 = f"http://{self.address('s3')}:{S3_PORT}"
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("MASKQ_")},
            "PYTHONPATH": str(ROOT),
            "MASKQ_REDIS_URL": f"{sentinels}/0",
            "MASKQ_REDIS_SENTINEL_MASTER": MASTER,
            "MASKQ_S3_BUCKET": BUCKET,
            "MASKQ_S3_ENDPOINT_URL": s3,
            "MASKQ_S3_REGION": "us-east-1",
            "MASKQ_S3_ACCESS_KEY_ID": "testing",
            "MASKQ_S3_SECRET_ACCESS_KEY": "testing-secret",
            "MASKQ_S3_PATH_STYLE": "true",
            "MASKQ_S3_TIMEOUT_S": "3",
            "MASKQ_DATA_DIR": str(self.folder / "data"),
            "MASKQ_MODELS_MANIFEST": str(manifest),
            "MASKQ_ORT_INTRA_OP_THREADS": "1",
            "MASKQ_WORKER_CONCURRENCY": "1",
            "MASKQ_WORKER_METRICS_PORT": "0",
            "MASKQ_LOG_FORMAT": "json",
            "MASKQ_LOG_LEVEL": "INFO",
            "MASKQ_DEV_KEY": "false",
            "MASKQ_DEFAULT_RATE": "1000000/minute",
            "MASKQ_GLOBAL_RATE": "1000000/minute",
            "MASKQ_RESULT_CACHE_ENABLED": "false",
            "MASKQ_WEBHOOK_ALLOWED_NETWORKS": str(SUBNET),
            "MASKQ_WEBHOOK_RETRY_SCHEDULE_S": "1,2,4,8,15,30,30,30",
            "MASKQ_WEBHOOK_TIMEOUT_S": "3",
            "MASKQ_WORKER_HEARTBEAT_S": "1",
            "MASKQ_RECOVERY_CHECK_S": "1",
            "MASKQ_RECOVERY_GRACE_S": "4",
            "MASKQ_UNACKED_RESTORE_INTERVAL_S": "5",
            "MASKQ_VISIBILITY_TIMEOUT_S": "120",
            "MASKQ_JOB_SOFT_TIME_LIMIT_S": "40",
            "MASKQ_JOB_HARD_TIME_LIMIT_S": "60",
            "MASKQ_STORAGE_RETRY_BOUND_S": "30",
            "MASKQ_WEB_WORKERS": "1",
            "MASKQ_WEB_THREADS": "16",
            **self.overrides,
        }

    # -- start and stop --------------------------------------------------------------------------

    def start(self) -> Cluster:
        from runtime.embedded_redis import server_binary

        self.logs.mkdir(parents=True, exist_ok=True)
        self.network = Network()
        try:
            for name in HOSTS:
                self.network.add(name)
            valkey = str(server_binary())
            primary = self.address("redis-1")
            for i, host in enumerate(DATA_HOSTS):
                data = self.folder / host
                data.mkdir(parents=True, exist_ok=True)
                argv = [valkey, "--bind", self.address(host), "--port", str(REDIS_PORT), "--protected-mode", "no"]
                argv += ["--dir", str(data), "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
                # As the README asks of a Sentinel deployment: a primary cut off from every replica for 5 s
                # refuses writes (which its demotion would throw away) instead of taking them.
                argv += ["--min-replicas-to-write", "1", "--min-replicas-max-lag", "5"]
                if i:
                    argv += ["--replicaof", primary, str(REDIS_PORT)]
                self._add(f"valkey@{host}", host, argv, dict(os.environ))
            for host in ("redis-1", "redis-2", "redis-3"):
                config = self.folder / f"sentinel-{host}.conf"
                config.write_text(
                    f"port {SENTINEL_PORT}\nbind {self.address(host)}\nprotected-mode no\n"
                    f"sentinel monitor {MASTER} {primary} {REDIS_PORT} 2\n"
                    f"sentinel down-after-milliseconds {MASTER} 2000\nsentinel failover-timeout {MASTER} 8000\n"
                )
                self._add(f"sentinel@{host}", host, [valkey, str(config), "--sentinel"], dict(os.environ))
            for name in list(self.processes):
                self.spawn(name)
            self._wait(lambda: self._sentinel_primary() == primary, 30, "the Sentinels to agree on the primary")
            self._wait(lambda: self.replicas_of("redis-1") == 2, 30, "both replicas to be in sync")
            self._add(
                "s3",
                "s3",
                [
                    PYTHON,
                    "-m",
                    "tests.integration.s3_server",
                    "--host",
                    self.address("s3"),
                    "--port",
                    str(S3_PORT),
                    "--journal",
                    str(self.folder / "s3-journal.jsonl"),
                ],
                {**os.environ, "PYTHONPATH": str(ROOT)},
            )
            self._add(
                "receiver",
                "client",
                [
                    PYTHON,
                    "-m",
                    "tests.integration.webhook_receiver",
                    "--host",
                    self.address("client"),
                    "--port",
                    str(RECEIVER_PORT),
                    "--plan",
                    str(self._receiver_plan()),
                    "--log",
                    str(self.received_path),
                ],
                {**os.environ, "PYTHONPATH": str(ROOT)},
            )
            # The web host reaches S3 through a proxy of its own, so that pair alone can be cut or slowed.
            self._add(
                "s3-proxy-web",
                "s3",
                [
                    PYTHON,
                    "-m",
                    "tests.cluster.proxy",
                    "--listen",
                    f"{self.address('s3')}:{S3_PROXY_PORT}",
                    "--to",
                    f"{self.address('s3')}:{S3_PORT}",
                    "--mode-file",
                    str(self.link_path("web-s3")),
                ],
                {**os.environ, "PYTHONPATH": str(ROOT)},
            )
            self.spawn("s3")
            self.spawn("s3-proxy-web")
            self.spawn("receiver")
            self._wait(self._bucket_made, 60, "the S3 server")
            env = self.service_env()
            commands = procfile()
            web = {**env, "MASKQ_S3_ENDPOINT_URL": f"http://{self.address('s3')}:{S3_PROXY_PORT}"}
            self._add("web", "web", ["/bin/sh", "-c", commands["web"]], {**web, "MASKQ_HOST": self.address("web")})
            self._add("webhooks", "web", ["/bin/sh", "-c", commands["webhooks"]], web)
            for host in ("worker-1", "worker-2"):
                self._add(host, host, ["/bin/sh", "-c", commands["worker"] + f" -n {host}@%h"], self.worker_env(env))
            for name in ("web", "webhooks", "worker-1", "worker-2"):
                self.spawn(name)
            self.api_key = self.python_in("web", _CREATE_KEY, env=env).strip().splitlines()[-1]
            self._wait(self.ready, 180, "the web's /readyz")
            return self
        except BaseException:
            self.close()
            raise

    def worker_env(self, env: dict[str, str]) -> dict[str, str]:
        """The inference workers' environment; with ``broken_fencing``, a build whose runs ignore their fence."""
        if not self.broken_fencing:
            return env
        return {**env, "PYTHONPATH": f"{Path(__file__).parent / 'broken_fencing'}:{ROOT}"}

    def link_path(self, pair: str) -> Path:
        return self.folder / f"link-{pair}.mode"

    def link(self, pair: str, mode: str) -> None:
        """Set a proxied pair's link (``web-s3``): ``pass``, ``cut``, ``cut-replies`` or ``slow MS``."""
        self.link_path(pair).write_text(mode)

    def _add(self, name: str, host: str, argv: list[str], env: dict[str, str]) -> None:
        assert self.network is not None
        self.processes[name] = Process(name, self.network.hosts[host], argv, env)

    def spawn(self, name: str) -> None:
        process = self.processes[name]
        process.popen = process.host.popen(process.argv, self.logs / f"{name}.log", env=process.env, cwd=ROOT)

    def start_host(self, host: str) -> None:
        """Start again every process of ``host`` (after :meth:`kill_host`)."""
        for name, process in self.processes.items():
            if process.host.name == host:
                self.spawn(name)

    def kill_host(self, host: str) -> None:
        assert self.network is not None
        self.network.hosts[host].kill()
        for process in self.processes.values():
            if process.host.name == host and process.popen is not None:
                process.popen.wait(10)

    def close(self) -> None:
        if self.network is not None:
            self.network.close()
            self.network = None
        for process in self.processes.values():
            if process.popen is not None and process.popen.poll() is None:
                process.popen.kill()
            if process.popen is not None:
                process.popen.wait(10)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- looking in ------------------------------------------------------------------------------

    def python_in(self, host: str, code: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
        """Run ``code`` with this Python inside ``host``; its stdout (raises on failure)."""
        assert self.network is not None
        answer = self.network.hosts[host].run(
            [PYTHON, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env={**(env or os.environ), "PYTHONPATH": str(ROOT)},
        )
        if answer.returncode:
            raise RuntimeError(f"in {host}: {answer.stderr[-2000:]}")
        return answer.stdout

    def ready(self) -> bool:
        try:
            return self.http_status("/readyz") == 200
        except (RuntimeError, subprocess.TimeoutExpired):
            return False

    def http_status(self, path: str) -> int:
        assert self.network is not None
        answer = self.network.hosts["client"].run(
            ["curl", "-s", "-o", "/dev/null", "-m", "5", "-w", "%{http_code}", self.base_url + path],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return int(answer.stdout or 0)

    def sentinel_primary(self) -> str | None:
        """The primary's address as the first Sentinel that answers names it (None when none answers)."""
        assert self.network is not None
        for via in DATA_HOSTS:
            if via in self.network.down or not self.network.hosts[via].pids():
                continue
            try:
                return self._sentinel_primary(via)
            except (RuntimeError, subprocess.TimeoutExpired):
                continue
        return None

    def _sentinel_primary(self, via: str = "redis-3") -> str | None:
        code = (
            "import redis;"
            f"a=redis.Redis(host={self.address(via)!r},port={SENTINEL_PORT},socket_timeout=2)"
            f".execute_command('SENTINEL','get-master-addr-by-name',{MASTER!r});print(a[0].decode() if a else '')"
        )
        return self.python_in(via, code, timeout=15).strip() or None

    def replicas_of(self, host: str) -> int:
        """How many replicas the Redis server on ``host`` has in sync (0 when it cannot be asked)."""
        code = (
            "import redis;"
            f"i=redis.Redis(host={self.address(host)!r},port={REDIS_PORT},socket_timeout=2).info('replication');"
            "print(sum(1 for k,v in i.items() if k.startswith('slave') and isinstance(v,dict)"
            " and v.get('state')=='online'))"
        )
        try:
            return int(self.python_in(host, code, timeout=15).strip() or 0)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError):
            return 0

    def sentinel_knows_replica(self, via: str = "redis-2") -> bool:
        code = (
            "import redis;"
            f"r=redis.Redis(host={self.address(via)!r},port={SENTINEL_PORT},socket_timeout=2)"
            f".execute_command('SENTINEL','replicas',{MASTER!r});print(len(r))"
        )
        try:
            return int(self.python_in(via, code, timeout=15).strip() or 0) > 0
        except (RuntimeError, subprocess.TimeoutExpired, ValueError):
            return False

    def _bucket_made(self) -> bool:
        code = (
            "import boto3;from botocore.config import Config;"
            f"c=boto3.client('s3',endpoint_url='http://{self.address('s3')}:{S3_PORT}',region_name='us-east-1',"
            "aws_access_key_id='testing',aws_secret_access_key='testing-secret',"
            "config=Config(s3={'addressing_style':'path'},connect_timeout=1,read_timeout=2,retries={'max_attempts':1}));"
            f"c.create_bucket(Bucket={BUCKET!r})"
        )
        try:
            self.python_in("s3", code, timeout=20)
            return True
        except (RuntimeError, subprocess.TimeoutExpired):
            return False

    @property
    def received_path(self) -> Path:
        return self.folder / "received.jsonl"

    def _receiver_plan(self) -> Path:
        path = self.folder / "receiver-plan.json"
        path.write_text(json.dumps({"responses": [], "default": {"status": 200}}))
        return path

    def worker_logs(self) -> list[Path]:
        return [self.logs / f"{name}.log" for name in ("worker-1", "worker-2")]

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def load(self, history: Path, *args: str) -> subprocess.Popen:
        """Start the load (``tests/cluster/load.py``) in the client host, recording to ``history``."""
        argv = [PYTHON, "-m", "tests.cluster.load", "--base-url", self.base_url, "--key", self.api_key]
        argv += ["--webhook-url", self.receiver_url, "--history", str(history), *args]
        assert self.network is not None
        return self.network.hosts["client"].popen(
            argv, self.logs / "load.log", env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT
        )

    @staticmethod
    def _wait(condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.5)


# Run in the web host with the service's settings: a key for the load's tenant, printed.
_CREATE_KEY = """
from config.settings import load_settings
from runtime.redis_connection import connect
from stores.tenants import KeyStore
s = load_settings()
print(KeyStore(connect(s.broker_url, s.redis_sentinel_master)).create("cluster", label="cluster")[0])
"""
