"""The soak run, short: a minute of mixed load while every kind of fault strikes; nothing may be lost.

``make soak`` runs the same for ten minutes (``bench/soak.py`` says what it does and checks).
"""

from __future__ import annotations

import pytest

from bench.soak import Soak


@pytest.mark.long  # `make test-long`
def test_a_minute_of_mixed_load_under_every_fault_loses_nothing_and_runs_nothing_twice(tmp_path):
    report = Soak(minutes=1.0, clients=3, folder=tmp_path).run()
    assert set(report["faults"]) == {
        "SIGKILL of a pool process",
        "SIGKILL of a whole worker",
        "Redis stopped and started again",
        "S3 server down for 20 s",
        "webhook receiver down for 12 s",
        "Redis SIGKILLed and started again",
    }
    assert report["jobs accepted"] > 100 and report["webhook events expected"] > 10
    for figure in (
        "lost (no record)",
        "stuck (not ended)",
        "ran to a result twice",
        "webhook events missing",
        "webhook events under two ids",
        "5xx (other than 503 + Retry-After)",
    ):
        assert report[figure] == [], (figure, report[figure][:10], report["logs"])
    assert report["clean"]
