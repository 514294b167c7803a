"""A Redis that stops answering (a partition drops packets without a word) is an error within
``MASKQ_REDIS_SOCKET_TIMEOUT_S``, not a call that hangs until TCP gives up.

The "Redis" here is a real TCP listener on loopback that takes connections and never answers, as a
server behind a partition looks to its clients. The web's and the workers' clients are built by
``runtime.redis_connection.service_client``.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import redis

from runtime.redis_connection import connect, service_client
from tests.conftest import settings_from


@pytest.fixture
def silent_redis():
    """``redis://`` URL of a listener that accepts and then says nothing, ever."""
    listener = socket.create_server(("127.0.0.1", 0))
    taken: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                taken.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    stop.set()
    thread.join(5)
    for conn in taken:
        conn.close()
    listener.close()


def test_a_redis_that_stops_answering_is_a_timeout_for_the_service_but_a_hang_without_it(base_env, silent_redis):
    settings = settings_from({**base_env, "MASKQ_REDIS_URL": silent_redis}, redis_socket_timeout_s=0.3)
    # Without a socket timeout (redis-py's default) the call is still waiting seconds later.
    bare = connect(silent_redis)
    outcome: list[BaseException] = []
    waiting = threading.Thread(target=lambda: _record(outcome, bare.get, "k"), daemon=True)
    waiting.start()
    waiting.join(2)
    assert waiting.is_alive() and not outcome
    # The service's client gives up: each try bounded by the timeout, redis-py's own few retries included.
    client = service_client(settings)
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        client.get("k")
    assert 0.3 <= time.monotonic() - started < 30


def _record(outcome: list, call, *args) -> None:
    try:
        call(*args)
    except BaseException as exc:  # (the listener closing ends the bare call at teardown)
        outcome.append(exc)


def test_the_web_and_the_workers_use_the_bounded_client(base_env, monkeypatch):
    """The clients the service builds carry the setting (the behaviour itself is the test above)."""
    from webapp.app import create_app
    from workers.job_end import _main_process_jobs

    for name, value in {**base_env, "MASKQ_REDIS_SOCKET_TIMEOUT_S": "7.5"}.items():
        monkeypatch.setenv(name, value)
    app = create_app(settings_from(base_env, redis_socket_timeout_s=7.5))
    assert app.extensions["maskq"].redis.connection_pool.connection_kwargs["socket_timeout"] == 7.5
    _main_process_jobs.cache_clear()
    try:
        jobs, _ = _main_process_jobs()  # a worker's main process: its settings from the environment
        assert jobs.redis.connection_pool.connection_kwargs["socket_timeout"] == 7.5
    finally:
        _main_process_jobs.cache_clear()
