"""A submit whose job message the broker refuses (kombu's OperationalError) is a 503 with Retry-After, not a
500 (found by tests/cluster: a Sentinel failover's new primary refuses writes until a replica attaches); the
job's record, written before, stays marked unsent, for recovery to send."""

from __future__ import annotations

import kombu.exceptions

from tests.integration.helpers import small_png, submit


def test_a_message_the_broker_refuses_is_a_503_with_retry_after_and_the_job_is_left_for_recovery(
    client, redis_client, monkeypatch
):
    import webapp.jobs

    def refused(*args, **kwargs):
        raise kombu.exceptions.OperationalError("Not enough good replicas to write.")

    monkeypatch.setattr(webapp.jobs, "send_job", refused)  # the broker's answer, as kombu reports it
    answer = submit(client, small_png(3))
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5", answer.get_json()
    assert answer.mimetype == "application/problem+json"
    unsent = redis_client.zrange("maskq:unsent", 0, -1)
    assert len(unsent) == 1  # recovery sends it after its grace period (tests/integration/test_recovery.py)
