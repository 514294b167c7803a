"""What counting the service-wide job series costs: a job's record life with and without it, in one run.

Every job's submit, start and end count their series in the same Redis
transaction or Lua call as the record's write or move (``stores/job_metrics.py``).
This times a job's whole record life as a worker and the web drive it
(create, sent, start, succeed with its phases) against a real Redis server
(the embedded Valkey), with the transition script as shipped and with the
same script less its counting part, in alternating rounds on the same server.
``with ÷ without`` is the price; the absolute µs depend on the machine.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from bench.common import Options, free_port
from domain import keys
from domain.records import JobRecord
from runtime.embedded_redis import RedisServer
from stores import job_metrics
from stores.jobs import _TRANSITION, JobStore

ROUNDS = 6
WITHOUT = _TRANSITION.replace(keys.lua(job_metrics.COUNT_MOVE_LUA), "")


class Uncounted(JobStore):
    """The record store with the transition script less its counting, and no counting at create."""

    def __init__(self, client, ttl_s):
        super().__init__(client, ttl_s)
        self._transition = client.register_script(WITHOUT)

    def create(self, record, ttl_s=None):
        with self.redis.pipeline() as pipe:  # JobStore.create less its two counting commands
            pipe.hset(self.key(record.id), mapping=record.to_hash())
            pipe.expire(self.key(record.id), ttl_s or self.ttl_s)
            pipe.zadd(keys.lane_index(record.lane), {record.id: record.created_at})
            pipe.zadd(keys.UNSENT, {record.id: record.created_at})
            pipe.zadd(keys.CREATED, {f"{record.tenant}/{record.id}": record.created_at})
            pipe.execute()


def life(store: JobStore) -> float:
    """One job's record life; its seconds."""
    record = JobRecord(
        id=uuid.uuid4().hex,
        tenant="bench",
        lane="default",
        model="sam",
        model_version="1",
        input_key="tenants/bench/jobs/x/input.jpg",
        image_sha256="a" * 64,
        width=640,
        height=480,
        request={"prompts": {"points": [[1, 2, 1]]}},  # type: ignore[arg-type]  # its stored form
        traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01",
    )
    started = time.perf_counter()
    store.create(record)
    store.sent(record.id)
    store.start(record.id, "1", worker="bench:1")
    store.succeed(
        record.id,
        "tenants/bench/jobs/x/result.json",
        1,
        fence="bench:1",
        timings={"load": 0.01, "encode": 0.5, "predict": 0.05, "store": 0.01},
    )
    return time.perf_counter() - started


def run(options: Options) -> list[dict]:
    assert WITHOUT != _TRANSITION, "the counting part was not found in the transition script"
    jobs = max(2400, options.jobs * 30)
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(free_port(), Path(folder)).start()
        try:
            client = redis.Redis.from_url(server.url)
            stores = {"with counting": JobStore(client, 3600), "without counting": Uncounted(client, 3600)}
            for store in stores.values():
                [life(store) for _ in range(50)]  # warm-up: scripts loaded, connections open
            times: dict[str, list[float]] = {name: [] for name in stores}
            for _ in range(ROUNDS):
                for name, store in stores.items():
                    times[name] += [life(store) for _ in range(jobs // ROUNDS)]
        finally:
            server.kill()
    rows: list[dict[str, Any]] = [
        {
            "case": name,
            "jobs": len(t),
            "p50_us": round(statistics.median(t) * 1e6),
            "mean_us": round(statistics.fmean(t) * 1e6),
        }
        for name, t in times.items()
    ]
    ratio = rows[0]["p50_us"] / rows[1]["p50_us"]
    rows.append({"case": "with ÷ without (p50)", "jobs": "", "p50_us": round(ratio, 3), "mean_us": ""})
    return rows


def summary(rows: list[dict]) -> list[str]:
    return [f"job_metrics: counting in the record's moves costs x{rows[-1]['p50_us']} per job record life (p50)"]
