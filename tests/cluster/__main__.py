"""``python -m tests.cluster`` (``make cluster-faults``): every fault scenario on one cluster, then the table.

Exits non-zero when any scenario's history breaks a rule. ``--only NAME``
runs the scenarios whose name contains NAME; ``--folder`` keeps the logs and
histories there (a temporary folder otherwise, printed at the end).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.cluster import network, scenarios
from tests.cluster.cluster import Cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--load-s", type=float, default=45)
    args = parser.parse_args(argv)
    why = network.available()
    if why:
        print(f"cluster: network namespaces are not available here: {why}", file=sys.stderr)
        return 2
    folder = args.folder or Path(tempfile.mkdtemp(prefix="maskq-cluster-"))
    chosen = {n: f for n, f in scenarios.SCENARIOS.items() if not args.only or any(o in n for o in args.only)}
    results = []
    with Cluster(folder) as cluster:
        for name, fault in chosen.items():
            load_s = args.load_s * (4 if fault is scenarios.all_in_a_row else 1)
            results.append(scenarios.run(cluster, name, fault, load_s=load_s))
    print(scenarios.table(results))
    caught = True
    if not args.only:
        caught = fencing_check(folder)
    print(f"logs and histories: {folder}")
    return 0 if caught and all(r.verdict.ok for r in results) else 1


def fencing_check(folder: Path) -> bool:
    """One slow job whose worker is cut off mid-run: clean with the real build, caught with fencing disabled."""
    verdicts = {}
    for broken in (False, True):
        with Cluster(folder / f"fencing-{'broken' if broken else 'real'}", delay_s=8, broken_fencing=broken) as cluster:
            verdicts[broken] = scenarios.run(
                cluster,
                f"one slow job cut off, {'fencing disabled' if broken else 'real build'}",
                lambda c: scenarios.worker_partitioned(c, cut_s=12, after_s=1.5),
                load_s=1,
                clients=1,
                pause_s=100,
                kinds=("default",),
            ).verdict
    real = "clean" if verdicts[False].ok else "NOT CLEAN"
    violations = len(verdicts[True].broken["fencing"])
    broken = f"caught ({violations} fencing violation(s))" if violations else "NOT CAUGHT"
    print(f"fencing check: the real build {real}; the build with fencing disabled {broken}")
    return verdicts[False].ok and bool(verdicts[True].broken["fencing"])


if __name__ == "__main__":
    sys.exit(main())
