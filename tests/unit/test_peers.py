"""The peers benchmark's pure parts (bench/peers/common.py; compare.py's tables): the plan, the schedule of rounds,
the burst's timetable, the ratio tables.

No server is started and neither Ray nor LitServe is needed.
"""

import itertools
import math

import pytest

from bench.common import Options
from bench.peers import common as peers
from bench.peers import compare


def test_the_default_plan_is_the_issues_workloads():
    plan = peers.Plan.from_options(Options())
    assert (plan.burst_jobs, plan.burst_clients, plan.flood_jobs, plan.repeats) == (200, 50, 500, 200)
    assert plan.probes == 10 and plan.clients == 16
    assert plan.steady_jobs * plan.rounds == Options().jobs  # --jobs is the stack's steady jobs in all


def test_a_short_run_scales_every_count_down_and_keeps_whole_passes_over_the_images():
    plan = peers.Plan.from_options(Options(jobs=20, rounds=2), images=5)
    assert plan.steady_jobs == 10
    assert (plan.burst_jobs, plan.flood_jobs, plan.repeats) == (50, 125, 50)
    assert plan.burst_clients <= plan.burst_jobs
    tiny = peers.Plan.from_options(Options(jobs=1, rounds=4), images=5)
    assert tiny.steady_jobs == 5 and tiny.burst_jobs >= 10 and tiny.flood_jobs >= 20


@pytest.mark.parametrize("rounds", [1, 2, 4, 5])
def test_every_workload_runs_on_every_stack_and_the_order_rotates(rounds):
    plan = peers.schedule(rounds)
    assert len(plan) == rounds
    for order, _ in plan:
        assert sorted(order) == sorted(peers.STACKS)
    firsts = [order[0] for order, _ in plan]
    assert len(set(firsts)) == min(rounds, len(peers.STACKS))  # each round another stack goes first
    done = [w for _, work in plan for w in work]
    assert set(done) == set(peers.WORKLOADS)
    assert done.count("steady") == rounds and done.count("second_click") == rounds
    assert done.count("burst") == done.count("repeats") == done.count("priority") == 1


def test_the_flood_comes_last_in_the_last_round():
    plan = peers.schedule(3)
    assert all("priority" not in work for _, work in plan[:-1])
    assert plan[-1][1][-1] == "priority"
    assert peers.schedule(1)[0][1][-1] == "priority"


def test_the_burst_is_sent_evenly_within_its_spread():
    offsets = peers.burst_offsets(200, 2.0)
    assert len(offsets) == 200 and offsets[0] == 0
    assert max(offsets) < 2.0
    assert all(b - a == pytest.approx(0.01) for a, b in itertools.pairwise(offsets))


def test_ratios_are_against_maskq_whatever_the_rows_order():
    rows = [
        {"stack": "ray", "jobs_per_s": 3.0, "p99_s": 1.0},
        {"stack": "maskq", "jobs_per_s": 2.0, "p99_s": 4.0},
        {"stack": "flask", "jobs_per_s": 1.0, "p99_s": 2.0},
    ]
    out = {r["stack"]: r for r in peers.with_ratios(rows, ["jobs_per_s", "p99_s"])}
    assert out["maskq"]["jobs_per_s_x_maskq"] == 1.0
    assert out["ray"]["jobs_per_s_x_maskq"] == 1.5
    assert out["flask"]["p99_s_x_maskq"] == 0.5
    assert out["ray"]["p99_s"] == 1.0  # the figures themselves are kept


def test_no_ratio_without_a_figure_to_divide_by():
    rows = [
        {"stack": "maskq", "wait_s": 0.0, "rss_mb": float("nan")},
        {"stack": "ray", "wait_s": 2.0, "rss_mb": 100},
        {"stack": "litserve", "note": "litserve is not installed"},
    ]
    out = {r["stack"]: r for r in peers.with_ratios(rows, ["wait_s", "rss_mb"])}
    assert out["ray"]["wait_s_x_maskq"] == "" and out["ray"]["rss_mb_x_maskq"] == ""
    assert out["litserve"]["wait_s_x_maskq"] == ""
    without_maskq = peers.with_ratios([{"stack": "ray", "wait_s": 1.0}], ["wait_s"])
    assert without_maskq[0]["wait_s_x_maskq"] == ""


def test_outcomes_are_counted_by_how_they_ended():
    outcomes = [
        peers.Outcome(0.1, "ok", accepted=True),
        peers.Outcome(0.2, "timeout", accepted=True),
        peers.Outcome(0.3, "timeout"),
        peers.Outcome(0.1, "rejected"),
        peers.Outcome(0.1, "failed"),
    ]
    assert peers.count(outcomes) == {"accepted": 2, "ok": 1, "rejected": 1, "timed_out": 2, "failed": 1}


def test_tables_pool_the_rounds_and_name_a_missing_stack():
    plan = peers.Plan.from_options(Options(rounds=2))
    steady = {
        "maskq": [
            {"wall_s": 10.0, "latencies": [1.0] * 20, "ok": 20},
            {"wall_s": 10.0, "latencies": [3.0] * 20, "ok": 20},
        ],
        "flask": [{"wall_s": 40.0, "latencies": [2.0] * 40, "ok": 40}],
    }
    samples = {w: {} for w in peers.WORKLOADS}
    samples["steady"] = steady
    tables = compare.tables(
        plan, samples, {"maskq": {"rss_mb": 200, "pss_mb": 150, "processes": 6}}, {"ray": "ray is not installed"}
    )
    [title] = [t for t in tables if t.startswith("steady")]
    rows = {r["stack"]: r for r in tables[title]}
    assert rows["maskq"]["jobs"] == 40 and rows["maskq"]["jobs_per_s"] == 2.0
    assert rows["maskq"]["p50_s"] == 2.0  # both rounds' latencies pooled
    assert rows["flask"]["jobs_per_s_x_maskq"] == 0.5
    assert rows["ray"]["note"] == "ray is not installed"
    assert "litserve" not in rows  # neither measured nor said to be missing: no row
    [memory] = [t for t in tables if t.startswith("memory")]
    assert tables[memory][0]["rss_mb"] == 200 and math.isclose(tables[memory][0]["rss_mb_x_maskq"], 1.0)
