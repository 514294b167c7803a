"""The cluster's history checker (tests/cluster/history.py) on hand-made histories: clean ones pass, and each
kind of loss or double effect is named."""

from __future__ import annotations

import json

from tests.cluster.history import Run, check, runs_from_log_lines


def submit(job, t=0.0, webhook=False):
    return {"t": t, "kind": "submit", "job": job, "http": 202, "webhook": webhook}


def poll(job, status, t=1.0, result=None, http=200, code=None, message=None):
    return {
        "t": t,
        "kind": "poll",
        "job": job,
        "http": http,
        "status": status,
        "result": result,
        "error_code": code,
        "error_message": message,
    }


def hook(job, event, webhook_id):
    headers = {"maskq-event": event, "webhook-id": webhook_id}
    return {"headers": headers, "body": json.dumps({"id": job, "status": event.removeprefix("job.")})}


def started(job, run, attempt, t):
    return Run(t, job, run, attempt=attempt)


def ended(job, run, t, outcome="succeeded"):
    return Run(t, job, run, outcome=outcome)


def test_a_clean_history_passes_with_its_figures():
    client = [
        submit("a", webhook=True),
        poll("a", "running", 1),
        poll("a", "succeeded", 5, "r1"),
        poll("a", "succeeded", 9, "r1"),
        submit("b"),
        {"t": 0.5, "kind": "cancel", "job": "b", "http": 200},
        poll("b", "canceled", 2),
        submit("c"),
        poll("c", "failed", 3, code="storage", message="the store was away"),
    ]
    hooks = [hook("a", "job.succeeded", "m1"), hook("a", "job.succeeded", "m1")]  # a retry: the same id
    runs = [started("a", "w1:1", 1, 2), ended("a", "w1:1", 4)]
    runs += [started("c", "w2:1", 1, 2), ended("c", "w2:1", 3, "failed")]
    verdict = check(client, hooks, runs)
    assert verdict.ok, verdict.explain()
    assert verdict.row() == {
        "accepted": 3,
        "succeeded": 1,
        "failed with reason": 1,
        "canceled": 1,
        "lost": 0,
        "stuck": 0,
        "ran twice": 0,
        "webhooks missing": 0,
        "other violations": 0,
    }


def test_a_job_the_service_forgot_or_never_ended_is_lost_or_stuck():
    client = [submit("a"), poll("a", None, 3, http=404), submit("b"), poll("b", "running", 3), submit("c")]
    verdict = check(client, [], [])
    assert set(verdict.broken["lost"]) == {"a", "c"} and set(verdict.broken["stuck"]) == {"b"}
    assert not verdict.ok


def test_a_failure_without_a_reason_and_a_cancel_nobody_asked_for_are_named():
    client = [submit("a"), poll("a", "failed", 2), submit("b"), poll("b", "canceled", 2)]
    verdict = check(client, [], [])
    assert set(verdict.broken["no reason"]) == {"a"} and set(verdict.broken["canceled unasked"]) == {"b"}


def test_a_second_model_run_for_one_attempt_or_two_recorded_outcomes_is_running_twice():
    client = [submit("a"), poll("a", "succeeded", 9, "r"), submit("b"), poll("b", "succeeded", 9, "r")]
    runs = [
        started("a", "w1:1", 1, 1),
        started("a", "w2:1", 1, 2),  # a run the record never counted
        ended("a", "w2:1", 3),
        started("b", "w1:1", 1, 1),
        ended("b", "w1:1", 2),
        started("b", "w2:1", 2, 3),
        ended("b", "w2:1", 4),
    ]
    verdict = check(client, [], runs)
    assert set(verdict.broken["ran twice"]) == {"a", "b"}


def test_a_model_run_again_for_a_new_attempt_is_fine():
    client = [submit("a"), poll("a", "succeeded", 9, "r")]
    runs = [started("a", "w1:1", 1, 1), started("a", "w2:1", 2, 5), ended("a", "w2:1", 7)]
    assert check(client, [], runs).ok


def test_an_outcome_written_by_a_run_another_had_taken_over_breaks_fencing():
    # worker-1 was cut off mid-job; the job went to worker-2, and worker-1, back, wrote its outcome anyway.
    client = [submit("a"), poll("a", "succeeded", 9, "r")]
    runs = [started("a", "w1:1", 1, 1), started("a", "w2:1", 2, 5), ended("a", "w1:1", 6)]
    verdict = check(client, [], runs)
    assert set(verdict.broken["fencing"]) == {"a"} and "w1:1 recorded succeeded while w2:1" in verdict.explain()


def test_a_result_published_again_with_other_content_or_another_status_is_a_change():
    client = [
        submit("a"),
        poll("a", "succeeded", 3, "r1"),
        poll("a", "succeeded", 9, "r2"),
        submit("b"),
        poll("b", "succeeded", 3, "r"),
        poll("b", "failed", 9, code="x", message="y"),
    ]
    assert set(check(client, [], []).broken["changed"]) == {"a", "b"}


def test_a_missing_webhook_a_second_id_and_a_contradicting_end_event_are_named():
    client = [
        submit("a", webhook=True),
        poll("a", "succeeded", 3, "r"),
        submit("b", webhook=True),
        poll("b", "succeeded", 3, "r"),
        submit("c", webhook=True),
        poll("c", "succeeded", 3, "r"),
    ]
    hooks = [
        hook("b", "job.succeeded", "m1"),
        hook("b", "job.succeeded", "m2"),
        hook("c", "job.succeeded", "m3"),
        hook("c", "job.failed", "m4"),
    ]
    verdict = check(client, hooks, [])
    assert set(verdict.broken["webhooks missing"]) == {"a"}
    assert set(verdict.broken["two ids"]) == {"b"}
    assert set(verdict.broken["contradicting webhook"]) == {"c"}


def test_runs_are_read_from_the_workers_json_log_lines():
    lines = [
        {"ts": "2026-12-07T14:01:21.355Z", "message": "job a1: attempt 2 started by vm:20384"},
        {"ts": "2026-12-07T14:01:23.517Z", "message": "job a1: succeeded with 1 instances (run of vm:20384)"},
        {"ts": "2026-12-07T14:01:24.000Z", "message": "job b2: failed with storage (run of vm:7)"},
        {"ts": "2026-12-07T14:01:24.000Z", "message": "job b2: is succeeded; not running it"},
    ]
    runs = runs_from_log_lines(lines)
    assert [(r.job, r.run, r.attempt, r.outcome) for r in runs] == [
        ("a1", "vm:20384", 2, None),
        ("a1", "vm:20384", None, "succeeded"),
        ("b2", "vm:7", None, "failed"),
    ]
    assert round(runs[1].t - runs[0].t, 3) == 2.162


def test_a_5xx_other_than_a_503_with_retry_after_is_a_server_error():
    client = [
        {"t": 1.0, "kind": "submit", "job": None, "http": 503, "retry_after": True},
        {"t": 2.0, "kind": "submit", "job": None, "http": 500, "retry_after": False},
        {"t": 3.0, "kind": "submit", "job": None, "http": 503, "retry_after": False},
    ]
    verdict = check(client, [], [])
    assert sorted(verdict.broken["server error"]) == ["submit@2.000", "submit@3.000"]
