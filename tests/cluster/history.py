"""The history of a cluster run and the checker that holds it to "nothing lost, nothing done twice".

A history has three sources, all recorded while the run went on:

- the client's requests and answers (``tests/cluster/load.py``): every
  submit, poll and cancel;
- the webhook receiver's log: every delivery that reached the client host;
- the runs, from the inference workers' logs: each model run of a job
  (``job J: attempt N started by RUN``) and each outcome a run recorded
  (``succeeded … (run of RUN)``, ``failed with CODE (run of RUN)``).

:func:`check` is pure: it takes those lists and returns a :class:`Verdict`
that names every job that broke a rule. For every accepted job:

- it ended: ``lost`` if the service no longer knows it, ``stuck`` if it is
  still queued or running; a failure carries a reason (``no reason``), and a
  cancel is one the client asked for (``canceled unasked``);
- ``ran twice``: its model ran twice for one recorded attempt, or two runs
  recorded an outcome;
- ``changed``: two reads of it after it ended disagree (another status, or a
  result published again with other content);
- ``fencing``: an outcome was recorded by a run that was no longer the job's
  latest (another run had started it since): two workers both "owned" it;
- webhooks: the end event it asked for arrived (``webhooks missing``), every
  event arrived under one ``webhook-id`` (``two ids``), and no end event
  contradicts how it ended (``contradicting webhook``).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ENDED = {"succeeded", "failed", "canceled", "expired"}
RULES = (
    "lost",
    "stuck",
    "no reason",
    "canceled unasked",
    "ran twice",
    "changed",
    "fencing",
    "webhooks missing",
    "two ids",
    "contradicting webhook",
    "server error",
)
_START = re.compile(r"job (\w+): attempt (\d+) started by (\S+)$")
_SUCCEEDED = re.compile(r"job (\w+): succeeded with \d+ instances \(run of (\S+)\)$")
_FAILED = re.compile(r"job (\w+): failed with (\w+) \(run of (\S+)\)$")


@dataclass(frozen=True)
class Run:
    """One line of a worker's story about a job: a model run starting, or a run recording an outcome."""

    t: float
    job: str
    run: str
    attempt: int | None = None  # a start
    outcome: str | None = None  # an outcome: "succeeded" or "failed"


@dataclass
class Verdict:
    """What the checker found: figures, and for each rule the jobs that broke it (with why)."""

    accepted: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    broken: dict[str, dict[str, str]] = field(default_factory=lambda: {rule: {} for rule in RULES})

    def flag(self, rule: str, job: str, why: str) -> None:
        self.broken[rule].setdefault(job, why)

    @property
    def ok(self) -> bool:
        return not any(self.broken.values())

    def row(self) -> dict[str, int]:
        """The figures of docs/reliability.md's table."""
        return {
            "accepted": self.accepted,
            "succeeded": self.by_status.get("succeeded", 0),
            "failed with reason": self.by_status.get("failed", 0) - len(self.broken["no reason"]),
            "canceled": self.by_status.get("canceled", 0),
            "lost": len(self.broken["lost"]),
            "stuck": len(self.broken["stuck"]),
            "ran twice": len(self.broken["ran twice"]),
            "webhooks missing": len(self.broken["webhooks missing"]),
            "other violations": sum(
                len(self.broken[r]) for r in RULES if r not in ("lost", "stuck", "ran twice", "webhooks missing")
            ),
        }

    def explain(self, limit: int = 10) -> str:
        lines = [f"{rule}: {len(jobs)}" for rule, jobs in self.broken.items() if jobs]
        for rule, jobs in self.broken.items():
            for job, why in list(jobs.items())[:limit]:
                lines.append(f"  {rule} {job}: {why}")
        return "\n".join(lines) or "clean"


def check(client: list[dict], webhooks: list[dict], runs: list[Run]) -> Verdict:
    """Hold the history to the rules (the module's docstring); pure."""
    verdict = Verdict()
    accepted: dict[str, dict] = {}
    polls: dict[str, list[dict]] = defaultdict(list)
    cancels: set[str] = set()
    for event in sorted(client, key=lambda e: e["t"]):
        job = event.get("job")
        http = event.get("http") or 0
        if http >= 500 and not (http == 503 and event.get("retry_after", event["kind"] != "submit")):
            verdict.flag("server error", f"{event['kind']}@{event['t']:.3f}", f"answered {http}")
        if event["kind"] == "submit" and job:
            accepted.setdefault(job, event)
        elif event["kind"] == "poll" and job:
            polls[job].append(event)
        elif event["kind"] == "cancel" and job:
            cancels.add(job)
    verdict.accepted = len(accepted)
    final: dict[str, str] = {}
    for job in accepted:
        answered = [p for p in polls[job] if p.get("http") in (200, 404)]
        last = answered[-1] if answered else None
        if last is None or last["http"] == 404:
            verdict.flag("lost", job, "no record" if last else "never answered")
            continue
        status = last["status"]
        verdict.by_status[status] = verdict.by_status.get(status, 0) + 1
        final[job] = status
        if status not in ENDED:
            verdict.flag("stuck", job, f"still {status}")
            continue
        if status == "failed" and not (last.get("error_code") and last.get("error_message")):
            verdict.flag("no reason", job, "failed without an error code and message")
        if status == "canceled" and job not in cancels:
            verdict.flag("canceled unasked", job, "canceled, but the client never asked")
        ends = {(p["status"], p.get("result")) for p in answered if p["http"] == 200 and p["status"] in ENDED}
        if len(ends) > 1:
            verdict.flag("changed", job, f"read after it ended as {sorted(ends, key=str)}")
    _check_runs(verdict, accepted, final, runs)
    _check_webhooks(verdict, accepted, final, webhooks)
    return verdict


def _check_runs(verdict: Verdict, accepted: dict, final: dict[str, str], runs: list[Run]) -> None:
    by_job: dict[str, list[Run]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: r.t):
        by_job[run.job].append(run)
    for job, story in by_job.items():
        if job not in accepted:
            continue
        attempts = [r.attempt for r in story if r.attempt is not None]
        if len(attempts) != len(set(attempts)):
            verdict.flag("ran twice", job, f"its model ran more than once for one attempt: attempts {attempts}")
        outcomes = [r for r in story if r.outcome is not None]
        if len(outcomes) > 1:
            verdict.flag("ran twice", job, f"{len(outcomes)} runs recorded an outcome: {[o.run for o in outcomes]}")
        for outcome in outcomes:
            started = [r for r in story if r.attempt is not None and r.t <= outcome.t]
            if not started or started[-1].run != outcome.run:
                owner = started[-1].run if started else "no run"
                verdict.flag("fencing", job, f"{outcome.run} recorded {outcome.outcome} while {owner} owned the job")
            elif final.get(job) in ENDED and final[job] != outcome.outcome and final[job] != "canceled":
                verdict.flag("changed", job, f"{outcome.run} recorded {outcome.outcome}; it ended {final[job]}")


def _check_webhooks(verdict: Verdict, accepted: dict, final: dict[str, str], webhooks: list[dict]) -> None:
    ids: dict[tuple[str, str], set[str]] = defaultdict(set)
    for delivery in webhooks:
        body = json.loads(delivery["body"]) if delivery.get("body") else {}
        job, event = body.get("id"), delivery["headers"].get("maskq-event")
        if job in accepted and event:
            ids[(job, event)].add(delivery["headers"].get("webhook-id", ""))
    for (job, event), seen in ids.items():
        if len(seen) > 1:
            verdict.flag("two ids", job, f"{event} arrived under {len(seen)} ids")
        end = event.removeprefix("job.")
        if end in ENDED and final.get(job) in ENDED and end != final[job]:
            verdict.flag("contradicting webhook", job, f"{event} arrived; the job ended {final[job]}")
    for job, submit in accepted.items():
        if submit.get("webhook") and final.get(job) in ENDED and (job, f"job.{final[job]}") not in ids:
            verdict.flag("webhooks missing", job, f"job.{final[job]} never arrived")


# -- reading the recorded files ------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill, or not JSON (a library's own print)
    return out


def runs_from_log_lines(lines: list[dict]) -> list[Run]:
    """The runs in a worker's JSON log lines (``MASKQ_LOG_FORMAT=json``)."""
    runs = []
    for line in lines:
        message = line.get("message")
        if not isinstance(message, str) or not message.startswith("job "):
            continue
        t = datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()
        if match := _START.match(message):
            runs.append(Run(t, match.group(1), match.group(3), attempt=int(match.group(2))))
        elif match := _SUCCEEDED.match(message):
            runs.append(Run(t, match.group(1), match.group(2), outcome="succeeded"))
        elif match := _FAILED.match(message):
            runs.append(Run(t, match.group(1), match.group(3), outcome="failed"))
    return runs


def check_files(history: Path, received: Path, worker_logs: list[Path]) -> Verdict:
    runs = [run for log in worker_logs for run in runs_from_log_lines(read_jsonl(log))]
    return check(read_jsonl(history), read_jsonl(received), runs)
