"""One webhook delivery attempt, made by a worker: sign, POST, log, and schedule the next attempt.

The messages and their log are the domain's (``domain/webhooks.py``,
``stores/delivery_log.py``); this is the part that talks to the receiver,
through the guarded HTTP transport beside it (``workers/webhook_transport.py``).
Each attempt is signed afresh (``webhook-timestamp`` is the attempt's time),
logged, and on failure scheduled again after the next pause of
``webhook_retry_schedule_s`` (jittered; longer if the receiver's
``Retry-After`` asks). A 410 disables the URL. Nothing here touches the job's
record: delivery cannot fail a job.

Long pauses are taken in hops no longer than half the broker's visibility
timeout, because a Redis broker hands an ETA message that outlives that
timeout to a second worker (celery#5935).
"""

from __future__ import annotations

import json
import logging
import time

import redis
import requests
from celery import current_app

from config.task_names import DELIVER_WEBHOOK, WEBHOOK_QUEUE
from domain.documents import stored_job_document
from domain.webhook_urls import ForbiddenAddress, guard_for
from domain.webhooks import (
    DISABLED_URLS,
    USER_AGENT,
    Message,
    dumps,
    next_pause,
    retry_after_seconds,
    sign,
    started_body,
)
from runtime import logs
from stores.delivery_log import DeliveryLog
from stores.job_metrics import WEBHOOK_ATTEMPTS, WEBHOOK_LAG, JobMetrics
from stores.webhooks import tenant_secret
from workers.webhook_transport import Deadline, guarded_session

log = logging.getLogger(__name__)


def deliver(worker, message_id: str, attempt: int = 1, generation: int = 0, not_before: float | None = None) -> None:
    """Make attempt ``attempt`` of message ``message_id`` (or wait for ``not_before``), log it, schedule the next."""
    with logs.job_context():
        _deliver(worker, message_id, attempt, generation, not_before)


def _deliver(worker, message_id: str, attempt: int, generation: int, not_before: float | None) -> None:
    settings = worker.settings
    deliveries = DeliveryLog(worker.redis)
    message = deliveries.get(message_id)
    # Gone (retention), superseded by a redelivery, or already settled: nothing to do.
    if message is None or message.generation != generation or message.status != "pending":
        return
    logs.bind_job(job_id=message.job_id, tenant=message.tenant)
    due = not_before or 0
    wait = due - time.time()
    if wait > 0.005:
        _schedule(message_id, attempt, generation, due, wait, settings.visibility_timeout_s)
        return
    metrics = JobMetrics(worker.redis)
    if worker.redis.hexists(DISABLED_URLS, message.url):
        deliveries.record(message, None, "not sent: a 410 answer disabled deliveries to this URL", 0)
        deliveries.settle(message, "disabled")
        metrics.count(WEBHOOK_ATTEMPTS, "skipped_disabled")
        return
    status, error, retry_after, permanent, started = None, None, None, False, time.monotonic()
    try:
        body = message.body or deliveries.freeze_body(message, _first_body(message, worker))
        _bind_job_of(body)
        status, retry_after = _post(message, body, settings, worker.redis)
        if not 200 <= status < 300:
            error = f"HTTP {status}"
    except ForbiddenAddress as exc:
        error, permanent = str(exc), True  # the log the client reads says "not allowed", never the address
        log.info("job %s: %s led to %s, which webhooks may not call", message.job_id, message.url, exc.address)
    except _JobGone as exc:
        error, permanent = str(exc), True
    except requests.RequestException as exc:
        error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a storage outage while building the body, among others: try again later
        error = f"{type(exc).__name__}: {exc}"
    deliveries.record(message, status, error, int((time.monotonic() - started) * 1000))
    if error is None:
        deliveries.settle(message, "succeeded")
        metrics.count(WEBHOOK_ATTEMPTS, "delivered")
        metrics.observe(WEBHOOK_LAG, seconds=time.time() - message.created_at)
        log.info("job %s: %s delivered (%s) on attempt %d", message.job_id, message.event, message.id, attempt)
    elif status == 410:
        metrics.count(WEBHOOK_ATTEMPTS, "gone")
        worker.redis.hset(DISABLED_URLS, message.url, json.dumps({"at": time.time(), "message_id": message.id}))
        deliveries.settle(message, "disabled")
        log.info("job %s: %s answered 410 Gone; deliveries to it are disabled", message.job_id, message.url)
    else:
        pause = (
            None
            if permanent
            else next_pause(
                attempt,
                settings.webhook_retry_schedule_s,
                settings.webhook_retry_jitter,
                retry_after,
                settings.webhook_retry_after_max_s,
            )
        )
        metrics.count(WEBHOOK_ATTEMPTS, "failed" if pause is None else "retry")
        if pause is None:
            deliveries.settle(message, "failed")
            log.info(
                "job %s: %s not delivered after attempt %d (%s); giving up",
                message.job_id,
                message.event,
                attempt,
                error,
            )
            return
        due = time.time() + pause
        deliveries.set_next(message, due)
        log.info(
            "job %s: %s attempt %d failed (%s); next in %.2f s", message.job_id, message.event, attempt, error, pause
        )
        _schedule(message_id, attempt + 1, generation, due, pause, settings.visibility_timeout_s)


class _JobGone(Exception):
    pass


def _bind_job_of(body: str) -> None:
    """The job's model, lane and trace (from the job document the body is) on this delivery's log lines."""
    try:
        doc = json.loads(body)
        logs.bind_job(model=doc["model"]["name"], lane=doc["lane"], traceparent=doc.get("traceparent"))
    except (ValueError, KeyError, TypeError):
        pass


def _traceparent(body: str) -> str | None:
    """The job's trace context, from the job document the body is."""
    try:
        return json.loads(body).get("traceparent")
    except (ValueError, AttributeError):
        return None


def _first_body(message: Message, worker) -> str:
    if message.snapshot:  # a job.started: the job as its start left it
        return started_body(message.snapshot)
    return _ending_body(message, worker)


def _ending_body(message: Message, worker) -> str:
    record = worker.jobs.get(message.job_id)
    if record is None:
        raise _JobGone(f"job {message.job_id} no longer exists; nothing to send")
    settings = worker.settings
    base_url = settings.public_url or f"http://{settings.host}:{settings.port}"
    return dumps(stored_job_document(record, worker.storage, base_url))


def _post(message: Message, body: str, settings, client: redis.Redis) -> tuple[int, float | None]:
    secret = tenant_secret(client, message.tenant, settings.webhook_secret if message.tenant == "default" else None)
    headers = sign(secret, message.id, int(time.time()), body)
    # The body is the job as GET shows it; which event it reports travels beside it.
    headers.update({"content-type": "application/json", "user-agent": USER_AGENT, "maskq-event": message.event})
    traceparent = _traceparent(body)
    if traceparent:  # the job's trace goes on to the receiver (W3C Trace Context)
        headers["traceparent"] = traceparent
    limit = settings.webhook_timeout_s  # for the whole attempt: connecting, sending, the answer's headers
    guard = guard_for(settings.webhook_allowed_networks)
    with Deadline(limit) as deadline, guarded_session(guard, deadline) as session:
        try:
            # No redirects: a webhook that moved must be registered again, and a redirect could lead inside.
            response = session.post(
                message.url, data=body.encode(), headers=headers, timeout=limit, allow_redirects=False, stream=True
            )
            response.close()
        except requests.RequestException as exc:
            if deadline.expired:
                raise requests.Timeout(f"no answer within {limit:g} s (the whole attempt)") from exc
            raise
    return response.status_code, retry_after_seconds(response.headers.get("retry-after"))


def _schedule(message_id: str, attempt: int, generation: int, due: float, wait: float, visibility_s: float) -> None:
    hop = max(0.0, min(wait, visibility_s / 2))
    current_app.send_task(
        DELIVER_WEBHOOK, args=[message_id, attempt, generation, due], countdown=hop, queue=WEBHOOK_QUEUE
    )
