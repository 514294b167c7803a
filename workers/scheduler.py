"""Scheduling inside each worker's main process, as a Celery consumer bootstep.

Two timers run on the consumer's own event loop (so cancelling and adding
queue consumers is safe): the resource gate, and lane upkeep (aging,
expiring jobs whose deadline passed while queued, canceling jobs whose
Cancel-After passed, putting back the jobs of dead batch claims, and recovery
of running jobs no process runs). Upkeep is
idempotent and atomic in Redis, so every worker may run it.
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import redis
from celery import bootsteps

from config.settings import LANES, load_settings
from config.task_names import WEBHOOK_QUEUE
from models.catalog import LiveCatalog
from runtime.redis_connection import connect
from stores.batches import BatchStore
from stores.jobs import JobStore
from stores.lanes import Lanes
from stores.webhooks import JobEvents, drain_outbox, notify_batches
from workers import job_end, metrics
from workers.batching import ClaimRecovery
from workers.gate import ResourceGate, detect_device
from workers.recovery import Recovery

log = logging.getLogger(__name__)


class SchedulingStep(bootsteps.StartStopStep):
    """Gate the lane consumers on free device memory; age lanes; expire overdue jobs."""

    requires: ClassVar[set[str]] = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        self.timers = []
        self.closed = False

    def start(self, consumer):
        settings = load_settings()
        client = connect(settings.broker_url, settings.redis_sentinel_master, socket_timeout=5)
        self.catalog = LiveCatalog(settings.models_manifest, settings.manifest_check_s, settings)
        self.settings = settings
        self.jobs = JobStore(client, settings.job_ttl_s, on_moved=JobEvents(client))  # expiries become webhook events
        self.lanes = Lanes(client, self.jobs, settings)
        self.batches = BatchStore(client, self.jobs)
        self.base_url = settings.public_url or f"http://{settings.host}:{settings.port}"
        self.claims = ClaimRecovery(client, self.jobs, grace_s=3 * settings.worker_heartbeat_s)
        self.recovery = Recovery(client, self.jobs, settings, self.catalog)
        self.next_recovery = time.monotonic() + settings.recovery_check_s
        self.gate = ResourceGate(
            detect_device(settings),
            self.catalog.current().memory_per_job_mb(),
            settings.gate_reserve_mb,
            client,
            worker=consumer.hostname,
        )
        # The lanes this worker consumes (a webhooks-only worker consumes none): the gate touches these alone.
        self.lanes_consumed = [lane for lane in LANES if lane in {q.name for q in consumer.task_consumer.queues}]
        self.check_gate(consumer)
        self.timers = [
            consumer.timer.call_repeatedly(settings.gate_check_s, self.check_gate, (consumer,), priority=10),
            consumer.timer.call_repeatedly(settings.scheduler_tick_s, self.upkeep, (), priority=10),
        ]

    def stop(self, consumer):
        for timer in self.timers:
            timer.cancel()
        self.timers = []

    def check_gate(self, consumer) -> None:
        try:
            # A new manifest may change what one job needs.
            self.gate.need_mb = self.catalog.current().memory_per_job_mb()
            state, _ = self.gate.check()
            series = metrics.series()
            series.gate_open.set(1 if state.open else 0)
            series.device_free.set(state.free_mb * 2**20)
            if not state.open and not self.closed:
                for lane in self.lanes_consumed:
                    consumer.cancel_task_queue(lane)
                self.closed = True
            elif state.open and self.closed:
                # Added back in lane order, the order the broker is polled in, and the webhooks queue
                # (which stays open) moved behind them again: a queue added back goes to the end.
                webhooks = WEBHOOK_QUEUE in {q.name for q in consumer.task_consumer.queues}
                if webhooks:
                    consumer.cancel_task_queue(WEBHOOK_QUEUE)
                for lane in self.lanes_consumed:
                    consumer.add_task_queue(lane)
                if webhooks:
                    consumer.add_task_queue(WEBHOOK_QUEUE)
                self.closed = False
            self.gate.publish(ttl_s=max(3 * self.settings.gate_check_s, 5))
        except redis.RedisError as exc:
            log.info("resource gate: Redis unavailable (%s)", exc)

    def upkeep(self) -> None:
        try:
            for job_id in self.jobs.expire_due():
                log.info("job %s: deadline passed while queued; expired", job_id)
            for job_id in self.jobs.cancel_due():  # queued or running: a running one's result is discarded
                log.info("job %s: its Cancel-After passed; canceled", job_id)
                job_end.settle(self.jobs, self.settings, self.catalog, job_id)  # identical jobs waiting on it
            promoted = self.lanes.promote_aged()
            if promoted:
                log.info("aging: %d job(s) moved to the interactive lane: %s", len(promoted), promoted[:5])
            for batch_id in self.batches.seal_abandoned(self.settings.batch_receive_timeout_s):
                log.info("batch %s: its upload went quiet (its uploader died?); sealed with the jobs it has", batch_id)
            # Batches whose last job just ended (or whose notifier died): their batch.completed webhook.
            notify_batches(self.batches, self.base_url)
            # Webhook messages whose writer died (or failed) before queuing them: queued now, same ids.
            drain_outbox(self.jobs.redis)
            recovered = self.claims.recover()  # jobs a dead pool process had taken along in a batch
            if recovered:
                log.info("batching: %d job(s) of a dead worker back on their lanes: %s", len(recovered), recovered[:5])
            if time.monotonic() >= self.next_recovery:
                self.next_recovery = time.monotonic() + self.settings.recovery_check_s
                self.recovery.sweep()  # running jobs that no live process runs
                self.recovery.send_unsent()  # queued jobs whose message was never sent
                self.recovery.send_orphans()  # old queued jobs whose message is nowhere (every minute)
        except redis.RedisError as exc:
            log.info("lane upkeep: Redis unavailable (%s)", exc)
        except Exception:  # the next tick tries again; a timer that raised would stop the upkeep for good
            log.exception("lane upkeep failed")
