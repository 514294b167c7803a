"""The inputs (built once a round, the same bytes for every stack) and the five workloads."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import cast

import requests

from bench.common import Options, load_images, run_threads
from bench.peers.common import (
    BURST_DEADLINE_S,
    BURST_SPREAD_S,
    CHEAP_IMAGE,
    PROBE_GAP_S,
    PROBE_IMAGE,
    TEXT_MODEL,
    Outcome,
    Plan,
    Stack,
    burst_offsets,
    count,
)
from bench.peers.maskq import MaskqStack


@dataclass
class Inputs:
    """The bytes each workload sends: every job a new image to every cache, but the repeats' one."""

    text: list[bytes]  # the test images in turn, each with one pixel changed
    cheap: list[bytes]  # variants of the cheapest image (burst, flood)
    probes: list[bytes]
    repeat: bytes  # the same bytes every time
    photos: list[tuple[bytes, tuple, tuple]] = field(default_factory=list)  # SAM: photo, first click, second click


_counter = itertools.count(1)


def _variant(data: bytes) -> bytes:
    from bench.sam_interactive import variant

    return variant(data, next(_counter))


def make_inputs(plan: Plan, options: Options) -> Inputs:
    """Built once for the run; every stack of a round gets the same bytes (each stack starts with empty caches)."""
    from bench.sam_interactive import CLICKS, PHOTOS

    images = load_images(options.images)
    by_name = dict(images)
    cheap = by_name.get(CHEAP_IMAGE, images[0][1])
    probe = by_name.get(PROBE_IMAGE, images[0][1])
    text = [_variant(images[i % len(images)][1]) for i in range(plan.steady_jobs + plan.warmup)]
    photos = [(_variant((PHOTOS / name).read_bytes()), first, second) for name, first, second in CLICKS]
    return Inputs(
        text=text,
        cheap=[_variant(cheap) for _ in range(max(plan.burst_jobs, plan.flood_jobs))],
        probes=[_variant(probe) for _ in range(plan.probes)],
        repeat=cheap,
        photos=photos,
    )


def run_parallel(jobs: list, clients: int, work) -> tuple[float, list[Outcome]]:
    """``work(session, job)`` for every job, ``clients`` at a time (one session each); ``(wall s, outcomes)``."""
    queue = iter(range(len(jobs)))
    lock = threading.Lock()
    outcomes: list[Outcome | None] = [None] * len(jobs)

    def client(session_factory=requests.Session):
        with session_factory() as session:
            while True:
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                outcomes[i] = work(session, jobs[i])

    return run_threads(client, clients, "peer-client"), cast("list[Outcome]", outcomes)  # every job has run


def warm(stack: Stack, inputs: Inputs, plan: Plan) -> None:
    """A few text jobs and a SAM click (not on a measured photo), discarded."""
    from bench.sam_interactive import CLICKS, PHOTOS

    with stack.session() as session:
        for data in inputs.text[plan.steady_jobs :]:
            stack.call(session, data, {"model": TEXT_MODEL}, 120)
        name, point, _ = CLICKS[0]
        outcome = stack.call(
            session, _variant((PHOTOS / name).read_bytes()), {"prompts": {"points": [[point[0], point[1], 1]]}}, 120
        )
        if outcome.status != "ok":
            raise RuntimeError(f"{stack.name}: the warm-up SAM click failed ({outcome.status})")


def steady(stack: Stack, inputs: Inputs, plan: Plan) -> dict:
    jobs = inputs.text[: plan.steady_jobs]
    factory = stack.session

    def work(session, data):
        return stack.call(session, data, {"model": TEXT_MODEL}, 120)

    queue = iter(range(len(jobs)))
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def client():
        with factory() as session:
            while True:
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                outcome = work(session, jobs[i])
                with lock:
                    outcomes.append(outcome)

    wall = run_threads(client, plan.clients, "peer-client")
    return {"wall_s": wall, "latencies": [o.latency_s for o in outcomes if o.status == "ok"], **count(outcomes)}


def burst(stack: Stack, inputs: Inputs, plan: Plan) -> dict:
    """``burst_jobs`` jobs sent on a fixed timetable over 2 s, by ``burst_clients`` clients (each job its own
    connection)."""
    offsets = burst_offsets(plan.burst_jobs, BURST_SPREAD_S)
    outcomes: list[Outcome | None] = [None] * len(offsets)
    ends: list[float] = []
    lock = threading.Lock()
    started = time.perf_counter() + 0.2

    def job(i: int) -> None:
        time.sleep(max(0.0, started + offsets[i] - time.perf_counter()))
        with stack.session() as session:
            outcome = stack.call(session, inputs.cheap[i], {"model": TEXT_MODEL}, BURST_DEADLINE_S, wait=False)
        outcomes[i] = outcome
        if outcome.status == "ok":
            with lock:
                ends.append(time.perf_counter() - started)

    threads = [threading.Thread(target=job, args=(i,), daemon=True) for i in range(len(offsets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [o for o in outcomes if o is not None]
    return {
        "last_result_s": max(ends) if ends else float("nan"),
        "latencies": [o.latency_s for o in done if o.status == "ok"],
        **count(done),
    }


def priority(stack: Stack, inputs: Inputs, plan: Plan) -> dict:
    """The flood (batch class) queued first, then the probes (interactive), one every ``PROBE_GAP_S``."""
    flood = inputs.cheap[: plan.flood_jobs]
    sent = [0]
    flood_outcomes: list[Outcome] = []
    lock = threading.Lock()
    if isinstance(stack, MaskqStack):
        # maskq: submitted to the batch lane and left there (202); 8 clients submit them.
        _, flood_outcomes = run_parallel(
            flood,
            8,
            lambda s, d: stack.call(_authorized(s, stack), d, {"model": TEXT_MODEL, "lane": "batch"}, 60, detach=True),
        )
        flood_threads = []
    else:
        # A peer has nowhere to leave a job: each flood job holds its connection until answered.
        def hold(data: bytes) -> None:
            with stack.session() as session:
                with lock:
                    sent[0] += 1
                outcome = stack.call(session, data, {"model": TEXT_MODEL, "lane": "batch"}, 900)
            with lock:
                flood_outcomes.append(outcome)

        flood_threads = [threading.Thread(target=hold, args=(d,), daemon=True) for d in flood]
        for t in flood_threads:
            t.start()
        while sent[0] < len(flood):  # each thread is about to send its request
            time.sleep(0.05)
        time.sleep(1.0)  # and has had time to send its request
    probe_outcomes: list[Outcome | None] = [None] * plan.probes

    def probe(i: int) -> None:
        with stack.session() as session:
            probe_outcomes[i] = stack.call(session, inputs.probes[i], {"model": TEXT_MODEL, "lane": "interactive"}, 900)

    started = time.perf_counter()
    probes = []
    for i in range(plan.probes):
        time.sleep(max(0.0, started + i * PROBE_GAP_S - time.perf_counter()))
        t = threading.Thread(target=probe, args=(i,), daemon=True)
        t.start()
        probes.append(t)
    for t in probes:
        t.join()
    for t in flood_threads:  # FIFO: the flood ended before the last probe; whatever is left goes with the stack
        t.join(timeout=5)
    done = [o for o in probe_outcomes if o is not None]
    return {
        "latencies": [o.latency_s for o in done if o.status == "ok"],
        **count(done),
        "flood_accepted": sum(o.accepted for o in flood_outcomes),
    }


def _authorized(session: requests.Session, stack: Stack) -> requests.Session:
    if isinstance(stack, MaskqStack):
        session.headers.update(stack.stack.headers)
    return session


def repeats(stack: Stack, inputs: Inputs, plan: Plan) -> dict:
    jobs = [inputs.repeat] * plan.repeats
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    queue = iter(range(len(jobs)))

    def client():
        with stack.session() as session:
            while True:
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                outcome = stack.call(session, jobs[i], {"model": TEXT_MODEL}, 300)
                with lock:
                    outcomes.append(outcome)

    wall = run_threads(client, plan.clients, "peer-client")
    return {
        "wall_s": wall,
        "latencies": [o.latency_s for o in outcomes if o.status == "ok"],
        "cached": sum(o.cached for o in outcomes),
        **count(outcomes),
    }


def second_click(stack: Stack, inputs: Inputs, plan: Plan) -> dict:
    first: list[float] = []
    second: list[float] = []
    reused = 0
    with stack.session() as session:
        for data, point_one, point_two in inputs.photos:
            for point, into in ((point_one, first), (point_two, second)):
                outcome = stack.call(
                    session, data, {"prompts": {"points": [[point[0], point[1], 1]]}, "lane": "interactive"}, 60
                )
                if outcome.status != "ok":
                    raise RuntimeError(f"{stack.name}: a SAM click ended {outcome.status}")
                into.append(outcome.latency_s)
                if into is second and ((outcome.body or {}).get("embedding") or {}).get("cached"):
                    reused += 1
    return {"first": first, "second": second, "reused": reused}


WORK = {"steady": steady, "burst": burst, "priority": priority, "repeats": repeats, "second_click": second_click}
