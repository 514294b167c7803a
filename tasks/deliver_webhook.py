"""The Celery task that makes one webhook delivery attempt (``workers/webhook_delivery.py`` does the work)."""

from __future__ import annotations

from celery import shared_task

from config.task_names import DELIVER_WEBHOOK
from workers import process, webhook_delivery


@shared_task(name=DELIVER_WEBHOOK, ignore_result=True)
def deliver_webhook(message_id: str, attempt: int = 1, generation: int = 0, not_before: float | None = None) -> None:
    webhook_delivery.deliver(process.current(), message_id, attempt, generation, not_before)
