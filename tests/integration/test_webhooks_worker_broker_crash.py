"""The webhooks worker rides out its broker's crash in-process (found by the soak run: kombu raised while it
put back its unacknowledged deliveries on the lost connection, and the worker exited)."""

from __future__ import annotations

import time

import pytest

from tests.conftest import IsolatedStack, free_port
from tests.integration.helpers import small_png, submit, wait_for
from tests.integration.webhook_receiver import Receiver


@pytest.fixture
def isolated(tmp_path, base_env):
    # Held messages come back after the visibility timeout: short here (the time limits below it).
    stack = IsolatedStack.start(
        tmp_path,
        base_env,
        MASKQ_VISIBILITY_TIMEOUT_S="20",
        MASKQ_JOB_SOFT_TIME_LIMIT_S="8",
        MASKQ_JOB_HARD_TIME_LIMIT_S="12",
        MASKQ_STORAGE_RETRY_BOUND_S="5",
        MASKQ_UNACKED_RESTORE_INTERVAL_S="2",
    )
    yield stack
    stack.close()


def test_the_webhooks_worker_survives_redis_being_sigkilled_with_deliveries_waiting_to_retry(isolated, tmp_path):
    receiver = Receiver(free_port(), tmp_path, default={"status": 500}).start()  # every attempt fails: retries wait
    try:
        hooks = isolated.worker(
            "hooks", queues="webhooks", MASKQ_WORKER_LOADS_MODELS="false", MASKQ_WEBHOOK_RETRY_SCHEDULE_S="20,20,20"
        )
        client = isolated.client()
        request = {"webhook": {"url": receiver.url, "events": ["job.canceled"]}}
        jobs = [submit(client, small_png(i), request).get_json()["id"] for i in range(12)]
        for job_id in jobs:  # no inference worker: a cancel alone ends each job, and its event goes out
            assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
        wait_for(lambda: len({r["headers"]["webhook-id"] for r in receiver.received()}) == len(jobs), 30)
        time.sleep(1)  # each failed attempt's retry is now a message the worker holds until it is due
        isolated.server.kill()
        time.sleep(2)
        isolated.server.start()
        receiver.plan([], {"status": 200})
        # Every event arrives on its retry (the held ones after the visibility timeout), delivered by the same
        # worker process, which never exited.
        wait_for(lambda: len([r for r in receiver.received() if r["n"] >= len(jobs)]) >= len(jobs), 90)
        assert hooks.alive, hooks.log()[-3000:]
        assert "Unrecoverable error" not in hooks.log()
    finally:
        receiver.stop()
