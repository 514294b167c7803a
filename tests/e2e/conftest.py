"""Fixtures of the end-to-end tests: the web front end as `make run` starts it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import requests

from tests.conftest import ROOT, VENV_BIN, free_port


@pytest.fixture
def web(base_env, worker, redis_client, tmp_path):
    """gunicorn as `make run` starts it, on the session's Redis and storage."""
    port = free_port()
    env = {**os.environ, **base_env, "MASKQ_PORT": str(port), "MASKQ_DEV_KEY": "false"}
    log = (tmp_path / "web.log").open("wb")
    process = subprocess.Popen(
        [str(VENV_BIN / "gunicorn"), "-c", "webapp/gunicorn_conf.py", "webapp.app:create_app()"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            assert time.monotonic() < deadline, (tmp_path / "web.log").read_text()
            time.sleep(0.2)
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)
    log.close()
