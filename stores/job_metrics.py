"""The service-wide job series: counters and histograms kept in Redis, read by the web's ``/metrics``.

A job's life spans processes (a web process creates it, any worker runs it,
any web process may cancel it), so its series are counted where its record
moves (``stores/jobs.py``), into two Redis hashes every process shares;
one scrape of any web process reads the totals of the whole service, and a
worker restart loses nothing. Labels are bounded: model (the manifest's),
lane, outcome, error code, phase, cache result, webhook outcome; never a job
id or a tenant.

A job's submit, start and end (with its phases) are counted in the same
atomic step as the record's write or move (:data:`COUNT_MOVE_LUA`), so
whoever sees a job ended sees it counted, and a process that dies cannot
count a move twice or not at all. The rest (cache lookups, out-of-memory
requeues, webhooks) is one round trip after what it counts. Per-process series (a worker's embedding
cache, batch sizes, its GPU) are the worker host's own: ``workers/metrics.py``.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from domain import keys

log = logging.getLogger(__name__)

SEP = "|"  # label values never hold it: model names, lanes, outcomes and codes are [A-Za-z0-9._-]
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class Series:
    name: str  # Prometheus name; counters end in _total, histograms in a base unit
    help: str
    labels: tuple[str, ...]
    histogram: bool = False


SUBMITTED = Series("maskq_jobs_submitted_total", "Jobs accepted, by model and lane", ("model", "lane"))
ENDED = Series(
    "maskq_jobs_ended_total",
    "Jobs ended, by model, lane, outcome and error code ('' for none)",
    ("model", "lane", "outcome", "code"),
)
QUEUE_WAIT = Series("maskq_job_queue_wait_seconds", "From submit (or requeue) to each start", ("model", "lane"), True)
RUN = Series(
    "maskq_job_run_seconds", "From the start of the run that ended a job to its end", ("model", "outcome"), True
)
TOTAL = Series("maskq_job_total_seconds", "From submit to end", ("model", "lane", "outcome"), True)
PHASE = Series(
    "maskq_job_phase_seconds",
    "Time a succeeded job spent in each phase: load, encode, predict, store",
    ("model", "phase"),
    True,
)
RESULT_CACHE = Series(
    "maskq_result_cache_lookups_total",
    "Submissions the result cache answered (hit), joined to an identical job in flight "
    "(coalesced), or sent to a worker (miss)",
    ("result",),
)
OOM_REQUEUES = Series(
    "maskq_job_oom_requeues_total", "Jobs put back on their lane after running out of memory", ("model",)
)
WEBHOOK_ATTEMPTS = Series("maskq_webhook_attempts_total", "Webhook delivery attempts, by outcome", ("outcome",))
WEBHOOK_LAG = Series("maskq_webhook_delivery_lag_seconds", "From an event to its delivery's success", (), True)

ALL = (SUBMITTED, ENDED, QUEUE_WAIT, RUN, TOTAL, PHASE, RESULT_CACHE, OOM_REQUEUES, WEBHOOK_ATTEMPTS, WEBHOOK_LAG)


def _field(series: Series, values: tuple[str, ...], part: str | None = None) -> str:
    if len(values) != len(series.labels):
        raise ValueError(f"{series.name} takes labels {series.labels}, got {values}")
    return SEP.join((series.name, *values) + ((part,) if part is not None else ()))


def add_count(pipe: redis.client.Pipeline, series: Series, values: tuple[str, ...], by: int = 1) -> None:
    """Count into ``pipe`` (a Redis pipeline: in a transaction, with what it counts)."""
    pipe.hincrby(keys.METRIC_COUNTERS, _field(series, values), by)


def add_observation(pipe: redis.client.Pipeline, series: Series, values: tuple[str, ...], seconds: float) -> None:
    seconds = max(0.0, seconds)
    bucket = bisect.bisect_left(LATENCY_BUCKETS, seconds)  # the first bound >= seconds; len() is +Inf
    pipe.hincrby(keys.METRIC_HISTOGRAMS, _field(series, values, f"b{bucket}"), 1)
    pipe.hincrbyfloat(keys.METRIC_HISTOGRAMS, _field(series, values, "sum"), seconds)


class JobMetrics:
    """Counts into Redis on its own round trip (what is not part of a record's move); never raises on a
    Redis error (a metric is not worth a job)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def count(self, series: Series, *values: str, by: int = 1) -> None:
        self._write(lambda pipe: add_count(pipe, series, values, by))

    def observe(self, series: Series, *values: str, seconds: float) -> None:
        self._write(lambda pipe: add_observation(pipe, series, values, seconds))

    def _write(self, add: Callable[[redis.client.Pipeline], None]) -> None:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                add(pipe)
                pipe.execute()
        except redis.RedisError as exc:
            log.info("metrics not recorded (Redis: %s)", exc)


# The part of the record's transition script (stores/jobs.py) that counts a move, in the same atomic
# step as the move: whoever sees a job ended sees it counted. It runs after the move, with ``current`` the
# status before it, ARGV[2] the status after, ARGV[4] the time, and the moved fields from ARGV[6] on.
COUNT_MOVE_LUA = """
local bounds = {BOUNDS}
local seen = redis.call('HMGET', KEYS[1], 'model', 'lane', 'created_at', 'started_at', 'requeued_at')
local model, lane, now = seen[1] or '', seen[2] or '', tonumber(ARGV[4])
local function observe(name, labels, seconds)
  if seconds < 0 then seconds = 0 end
  local bucket = #bounds
  for i, bound in ipairs(bounds) do
    if seconds <= bound then bucket = i - 1 break end
  end
  redis.call('HINCRBY', '${metric_histograms}', name .. '|' .. labels .. '|b' .. bucket, 1)
  redis.call('HINCRBYFLOAT', '${metric_histograms}', name .. '|' .. labels .. '|sum', seconds)
end
local ended = {succeeded = true, failed = true, canceled = true, expired = true}
if seen[3] and ARGV[2] == 'running' and current == 'queued' then
  observe('QUEUE_WAIT', model .. '|' .. lane, now - tonumber(seen[5] or seen[3]))
elseif seen[3] and ended[ARGV[2]] then
  local code = ''
  for i = 6, #ARGV - 1, 2 do
    if ARGV[i] == 'error' then code = cjson.decode(ARGV[i + 1]).code or '' end
    if ARGV[i] == 'timings' then  -- a success's seconds per phase (workers/pipeline.py)
      for phase, seconds in pairs(cjson.decode(ARGV[i + 1])) do observe('PHASE', model .. '|' .. phase, seconds) end
    end
  end
  redis.call('HINCRBY', '${metric_counters}', 'ENDED|' .. model .. '|' .. lane .. '|' .. ARGV[2] .. '|' .. code, 1)
  observe('TOTAL', model .. '|' .. lane .. '|' .. ARGV[2], now - tonumber(seen[3]))
  if current == 'running' and seen[4] then
    observe('RUN', model .. '|' .. ARGV[2], now - tonumber(seen[4]))
  end
end
"""
for _series in ("QUEUE_WAIT", "ENDED", "TOTAL", "RUN", "PHASE"):
    COUNT_MOVE_LUA = COUNT_MOVE_LUA.replace(f"'{_series}", f"'{globals()[_series].name}")
COUNT_MOVE_LUA = COUNT_MOVE_LUA.replace("{BOUNDS}", "{" + ", ".join(repr(b) for b in LATENCY_BUCKETS) + "}")


class JobMetricsCollector:
    """A prometheus_client collector over the Redis hashes, read at scrape time."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.METRIC_COUNTERS)
            pipe.hgetall(keys.METRIC_HISTOGRAMS)
            counters, histograms = pipe.execute()
        by_name = {s.name: s for s in ALL}
        counted: dict[str, dict[tuple[str, ...], float]] = {s.name: {} for s in ALL if not s.histogram}
        for raw, value in counters.items():
            name, *values = raw.decode().split(SEP)
            if name in counted:
                counted[name][tuple(values)] = float(value)
        buckets: dict[str, dict[tuple[str, ...], dict[str, float]]] = {s.name: {} for s in ALL if s.histogram}
        for raw, value in histograms.items():
            name, *rest = raw.decode().split(SEP)
            if name in buckets:
                *values, part = rest
                buckets[name].setdefault(tuple(values), {})[part] = float(value)
        for name, samples in counted.items():
            family = CounterMetricFamily(name, by_name[name].help, labels=by_name[name].labels)
            for values, value in sorted(samples.items()):
                family.add_metric(list(values), value)
            yield family
        for name, histograms_by_labels in buckets.items():
            histogram = HistogramMetricFamily(name, by_name[name].help, labels=by_name[name].labels)
            for values, parts in sorted(histograms_by_labels.items()):
                cumulative, running = [], 0.0
                for i, bound in enumerate((*LATENCY_BUCKETS, float("inf"))):
                    running += parts.get(f"b{i}", 0.0)
                    cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
                histogram.add_metric(list(values), cumulative, sum_value=parts.get("sum", 0.0))
            yield histogram
