"""How many of the heavy requests one web process serves at once: batch uploads, and clips being checked.

Each kind has a number of slots per process (a setting); a request of that kind takes one for as long as
it runs and gives it back at its answer. When every slot is taken the request is a 503 with
``Retry-After``, answered before it costs what the slot bounds: a batch's body is not read yet, a clip's
bytes past its first ones are not read into memory and no frame of it is decoded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from flask import current_app

from config.settings import Settings
from domain.errors import ServiceUnavailable


@contextmanager
def process_slot(kind: str, most: int) -> Iterator[None]:
    """One of this process's ``most`` slots for ``kind`` (said in the 503: "batch uploads") while it runs."""
    slots = current_app.extensions.setdefault(f"maskq.slots.{kind}", threading.BoundedSemaphore(most))
    if not slots.acquire(blocking=False):
        raise ServiceUnavailable(f"this server is taking {most} {kind} already; try again shortly", retry_after=5)
    try:
        yield
    finally:
        slots.release()


def batch_upload_slot(settings: Settings):
    return process_slot("batch uploads", settings.max_concurrent_batch_uploads)


def video_upload_slot(settings: Settings):
    """Held from a clip's first bytes to its answer: reading it into memory and decoding it to check it."""
    return process_slot("video uploads", settings.max_concurrent_video_uploads)
