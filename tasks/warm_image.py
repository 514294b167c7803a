"""The Celery task that runs a stored image's encoder ahead of its jobs (``workers/image_encoding.py`` does the
work); ``POST /v1/images`` queues it on the interactive lane."""

from __future__ import annotations

from celery import shared_task

from config.task_names import WARM_IMAGE
from workers import image_encoding


@shared_task(name=WARM_IMAGE, ignore_result=True)
def warm_image(tenant: str, image_id: str, model: str) -> None:
    image_encoding.warm(tenant, image_id, model)
