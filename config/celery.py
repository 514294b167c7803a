"""The Celery configuration, derived from the settings and nowhere else."""

from __future__ import annotations

from kombu import Queue

from config.settings import Settings, is_sentinel
from config.task_names import APPLY_RETENTION, DELIVER_WEBHOOK, LANES, WEBHOOK_QUEUE

# The name the broker connections of `-A workers.celery_app` processes (workers, beat, Flower) give
# themselves (Redis CLIENT SETNAME): the embedded Redis of `make run` stops only once none is left
# (cli/main.py), i.e. after each worker acknowledged its last job.
WORKER_CLIENT_NAME = "maskq-worker"


def celery_config(settings: Settings) -> dict:
    """Celery settings for lanes that are consumed in strict order and never lose a job.

    Lanes are separate queues, not message priorities: Redis has no native
    priority and kombu's emulation is approximate. With
    ``queue_order_strategy="priority"`` a worker always polls the queues in
    the order given, prefetch 1 keeps it from hoarding a lower-lane job while
    it works, and late acks plus reject-on-worker-lost put a job back when
    the process running it dies.
    """
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "queue_order_strategy": "priority",
            "visibility_timeout": settings.visibility_timeout_s,
            # How often a worker looks for messages a dead worker left unacknowledged and puts
            # them back (once older than the visibility timeout). kombu's default scans only
            # every tenth sweep: ~100 s.
            "unacked_restore_interval": settings.unacked_restore_interval_s,
            "unacked_restore_throttle": 1,
            # A sentinel:// broker URL: the primary the Sentinels name (runtime/redis_connection.py).
            **({"master_name": settings.redis_sentinel_master} if is_sentinel(settings.broker_url) else {}),
        },
        "task_queues": [Queue(lane, routing_key=lane) for lane in LANES]
        + [Queue(WEBHOOK_QUEUE, routing_key=WEBHOOK_QUEUE)],
        "task_routes": {DELIVER_WEBHOOK: {"queue": WEBHOOK_QUEUE}, APPLY_RETENTION: {"queue": WEBHOOK_QUEUE}},
        "beat_schedule": {
            "retention": {
                "task": APPLY_RETENTION,
                "schedule": settings.retention_interval_s,
                "options": {"queue": WEBHOOK_QUEUE, "expires": settings.retention_interval_s},
            },
        },
        "beat_schedule_filename": str(settings.data_dir / "celerybeat-schedule"),
        "task_default_queue": settings.default_lane,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "task_ignore_result": True,
        "task_soft_time_limit": settings.job_soft_time_limit_s,
        "task_time_limit": settings.job_hard_time_limit_s,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "worker_soft_shutdown_timeout": settings.worker_soft_shutdown_s,
        "worker_hijack_root_logger": False,
        # Loading models happens in worker_process_init; Celery's default allows 4 s.
        "worker_proc_alive_timeout": 120,
        # Task events only for a monitor that asks: Flower sends `enable_events` to the workers when it
        # starts (and again while it runs), so it still sees every task from `received` on. Without one,
        # events were 4 PUBLISHes a job nobody read (the worker's main process: 0.9 CPU ms a job;
        # bench/cpu_per_job.py). The web never sends `task-sent`.
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "timezone": "UTC",
    }


def create_celery(settings: Settings):
    """A Celery app for these settings; the web front end sends with it, the worker runs it."""
    from celery import Celery

    app = Celery("maskq", include=["tasks.run_job", "tasks.deliver_webhook", "tasks.retention", "tasks.warm_image"])
    app.conf.update(celery_config(settings))
    return app
