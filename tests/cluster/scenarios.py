"""The fault scenarios: load from the client host while a fault strikes, then heal, settle and check the history.

Each scenario is a function of the running :class:`~tests.cluster.cluster.Cluster`
that makes its fault and undoes it (it blocks meanwhile); :func:`run` drives
the load around it, waits for every accepted job to end and every webhook to
arrive, and returns the checker's :class:`~tests.cluster.history.Verdict`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from tests.cluster.cluster import DATA_HOSTS, Cluster
from tests.cluster.history import Verdict, check_files, read_jsonl


def _log(message: str) -> None:
    print(f"cluster: {time.strftime('%H:%M:%S')} {message}", flush=True)


def wait_for_run(cluster: Cluster, hosts: tuple[str, ...], since: float, timeout: float = 60) -> tuple[str, str]:
    """``(host, job id)`` of a model run that started on one of ``hosts`` after ``since`` (epoch seconds)."""
    from tests.cluster.history import runs_from_log_lines

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for host in hosts:
            runs = runs_from_log_lines(read_jsonl(cluster.logs / f"{host}.log"))
            started = [r for r in runs if r.attempt is not None and r.t > since]
            if started:
                return host, started[-1].job
        time.sleep(0.2)
    raise RuntimeError(f"no job started on {hosts} within {timeout:.0f} s")


def worker_partitioned(cluster: Cluster, cut_s: float = 15, after_s: float = 0.0) -> None:
    """A worker host loses its switch port while a job runs on it: its heartbeat lapses, the job goes to the
    other worker, and the cut-off run, back, must not record an outcome over the new owner's. ``after_s``:
    how long after the run started (past reading its input, into the model) the cut comes."""
    host, job = wait_for_run(cluster, ("worker-1", "worker-2"), time.time())
    time.sleep(after_s)
    _log(f"{host} partitioned for {cut_s:.0f} s, running job {job}")
    assert cluster.network is not None
    cluster.network.partition(host)
    time.sleep(cut_s)
    cluster.network.heal(host)
    _log(f"{host} healed")


def redis_failover(cluster: Cluster, down_s: float = 10) -> None:
    """The Redis primary's host dies; Sentinel promotes the replica; the old primary comes back (as a replica)."""
    deadline = time.monotonic() + 30
    while not cluster.sentinel_knows_replica() and time.monotonic() < deadline:
        time.sleep(1)
    primary = cluster.sentinel_primary()
    host = next(h for h in DATA_HOSTS if cluster.address(h) == primary)
    time.sleep(3)
    _log(f"{host} (the primary) killed")
    cluster.kill_host(host)
    deadline = time.monotonic() + 60
    while cluster.sentinel_primary() in (primary, None):
        if time.monotonic() > deadline:
            raise RuntimeError("Sentinel did not fail over in 60 s")
        time.sleep(0.5)
    _log(f"Sentinel promoted {cluster.sentinel_primary()}")
    time.sleep(down_s)
    cluster.start_host(host)
    _log(f"{host} back (the old primary, with its AOF)")
    time.sleep(5)


def redis_primary_partitioned(cluster: Cluster, cut_s: float = 25) -> None:
    """The Redis primary's host is cut off, alive: the Sentinels promote the replica while the old primary still
    holds its clients' connections; when it is plugged back in it is made a replica of the new one."""
    deadline = time.monotonic() + 30
    while not cluster.sentinel_knows_replica() and time.monotonic() < deadline:
        time.sleep(1)
    primary = cluster.sentinel_primary()
    host = next(h for h in DATA_HOSTS if cluster.address(h) == primary)
    time.sleep(3)
    assert cluster.network is not None
    _log(f"{host} (the primary) partitioned for {cut_s:.0f} s")
    cluster.network.partition(host)
    deadline = time.monotonic() + 60
    while cluster.sentinel_primary() in (primary, None):
        if time.monotonic() > deadline:
            raise RuntimeError("Sentinel did not fail over in 60 s")
        time.sleep(0.5)
    _log(f"Sentinel promoted {cluster.sentinel_primary()}")
    time.sleep(max(0.0, cut_s - 5))
    cluster.network.heal(host)
    _log(f"{host} healed (the old primary, to be made a replica)")
    time.sleep(5)


def web_s3_partition(cluster: Cluster, cut_s: float = 20) -> None:
    """The web host loses S3 (both ways) but still sees Redis; the workers still see S3."""
    time.sleep(3)
    _log(f"web <-> s3 cut for {cut_s:.0f} s")
    cluster.link("web-s3", "cut")
    time.sleep(cut_s)
    cluster.link("web-s3", "pass")
    _log("web <-> s3 healed")


def worker_killed(cluster: Cluster, down_s: float = 20) -> None:
    """A worker host dies mid-job (every process SIGKILLed) and boots again later."""
    host, job = wait_for_run(cluster, ("worker-2", "worker-1"), time.time())
    _log(f"{host} killed, running job {job}")
    cluster.kill_host(host)
    time.sleep(down_s)
    cluster.start_host(host)
    _log(f"{host} started again")


def slow_and_one_way(cluster: Cluster) -> None:
    """The web's link to S3 slow (400 ms a chunk), then cut one way (requests arrive, answers do not)."""
    _log("web -> s3 slow (400 ms per chunk) for 15 s")
    cluster.link("web-s3", "slow 400")
    time.sleep(15)
    _log("web -> s3 answers cut (one direction) for 10 s")
    cluster.link("web-s3", "cut-replies")
    time.sleep(10)
    cluster.link("web-s3", "pass")


def all_in_a_row(cluster: Cluster) -> None:
    faults = (worker_partitioned, redis_failover, redis_primary_partitioned, web_s3_partition, worker_killed)
    for fault in (*faults, slow_and_one_way):
        fault(cluster)
        time.sleep(5)


SCENARIOS: dict[str, Callable[[Cluster], None]] = {
    "worker partitioned mid-job": worker_partitioned,
    "Redis failover (old primary back)": redis_failover,
    "Redis primary partitioned (failover while it lives)": redis_primary_partitioned,
    "web <-> S3 partition": web_s3_partition,
    "worker host killed": worker_killed,
    "all of them in a row under load": all_in_a_row,
}


@dataclass
class Result:
    name: str
    verdict: Verdict
    seconds: float


def run(
    cluster: Cluster,
    name: str,
    fault: Callable[[Cluster], None],
    load_s: float = 40,
    clients: int = 2,
    pause_s: float = 2.0,
    settle_s: float = 240,
    kinds: tuple[str, ...] = (),
) -> Result:
    """``fault`` under ``load_s`` seconds of load (at least as long as the fault), then settle and check."""
    started = time.monotonic()
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    history = cluster.folder / f"history-{slug}.jsonl"
    _log(f"scenario: {name}")
    options = ["--seconds", str(load_s), "--clients", str(clients), "--pause-s", str(pause_s)]
    load = cluster.load(history, "load", *options, *(["--kinds", *kinds] if kinds else []))
    fault(cluster)
    load.wait(load_s + 120)
    settle = cluster.load(history, "settle", "--timeout", str(settle_s))
    settle.wait(settle_s + 120)
    # Webhooks may still be on their retry schedule: wait while any is missing, up to a minute.
    deadline = time.monotonic() + 60
    while True:
        verdict = check_files(history, cluster.received_path, cluster.worker_logs())
        if not verdict.broken["webhooks missing"] or time.monotonic() > deadline:
            break
        time.sleep(2)
    _log(f"{name}: {json.dumps(verdict.row())}")
    if not verdict.ok:
        _log(verdict.explain())
    return Result(name, verdict, time.monotonic() - started)


def table(results: list[Result]) -> str:
    """The results as docs/reliability.md's Markdown table."""
    columns = ["accepted", "succeeded", "failed with reason", "canceled", "lost", "stuck", "ran twice"]
    columns += ["webhooks missing", "other violations"]
    lines = ["| scenario | " + " | ".join(columns) + " | seconds |", "|---" * (len(columns) + 2) + "|"]
    for result in results:
        row = result.verdict.row()
        lines.append(f"| {result.name} | " + " | ".join(str(row[c]) for c in columns) + f" | {result.seconds:.0f} |")
    return "\n".join(lines)
