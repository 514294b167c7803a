"""``python -m bench [--only NAME] [--jobs N] [--clients N] [--warmup N] [--device]``: run the benchmarks,
print the tables.

Every module ``bench/<name>.py`` but ``common`` is a benchmark (it has ``run``); they
run one after another (never side by side: they would share the cores), in
name order except that ``service_efficiency`` runs last so that the output
ends with its ``service_efficiency=`` line. The rows also go to
``bench/results/<time>.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bench
from bench.common import IMAGES, Options, format_table, machine

NOT_BENCHMARKS = {"common", "__main__", "device_check", "web_floor"}  # device_check: `--device`, for a GPU machine
ONLY_WHEN_NAMED = {"soak"}  # ten minutes of faults: `make soak` or --only soak, never by default
LAST = ("service_efficiency",)
RESULTS = Path(__file__).resolve().parent / "results"


def discover() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(bench.__path__) if m.name not in NOT_BENCHMARKS]
    return sorted(names, key=lambda n: (n in LAST, LAST.index(n) if n in LAST else 0, n))


def parse_args(argv: list[str] | None, names: list[str]) -> argparse.Namespace:
    defaults = Options()
    parser = argparse.ArgumentParser(prog="python -m bench", description="Run maskq's benchmarks; print a table each.")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only this benchmark (repeatable, or comma-separated); one of: {', '.join(names)}",
    )
    parser.add_argument("--jobs", type=int, default=defaults.jobs, help="measured jobs per case (default %(default)s)")
    parser.add_argument(
        "--clients", type=int, default=defaults.clients, help="concurrent HTTP clients (default %(default)s)"
    )
    parser.add_argument(
        "--warmup", type=int, default=defaults.warmup, help="discarded warm-up jobs (default %(default)s)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=defaults.rounds,
        help="alternating measurement rounds per comparison (default %(default)s)",
    )
    parser.add_argument("--images", type=Path, default=IMAGES, help="folder of images to cycle (default %(default)s)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--device",
        action="store_true",
        help="run the GPU device check instead (bench/device_check.py; exits 0 without a GPU)",
    )
    args = parser.parse_args(argv)
    if args.only:
        args.only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"unknown benchmark {', '.join(unknown)}; there are: {', '.join(names)}")
    return args


def main(argv: list[str] | None = None) -> int:
    names = discover()
    args = parse_args(argv, names)
    if args.list:
        print("\n".join(names))
        return 0
    if args.device:
        from bench.device_check import main as device_check

        return device_check([])
    options = Options(jobs=args.jobs, clients=args.clients, warmup=args.warmup, rounds=args.rounds, images=args.images)
    selected = [n for n in names if (n in args.only if args.only else n not in ONLY_WHEN_NAMED)]
    host = machine()
    print(f"machine: {host['cpus']} CPUs, {host['cpu_model'] or 'unknown CPU'}; load average {host['load_avg']}")
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": host,
        "options": {k: str(v) for k, v in vars(options).items()},
        "benchmarks": {},
    }
    summaries: list[str] = []
    failed: list[str] = []
    for name in selected:
        print(f"\nrunning {name} ...", flush=True)
        started = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.{name}")
            rows = module.run(options)
        except Exception:  # one broken benchmark must not cost the others their figures
            traceback.print_exc()
            failed.append(name)
            continue
        print(format_table(f"{name} ({time.perf_counter() - started:.0f} s)", rows), flush=True)
        results["benchmarks"][name] = rows
        if hasattr(module, "summary"):
            summaries += module.summary(rows)
    results["machine"]["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nrows saved to {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    if failed:  # said before the figures, so that the output still ends with service_efficiency=
        print(f"\nFAILED: {', '.join(failed)} (tracebacks above)")
    if summaries:
        print("\n" + "\n".join(summaries))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
