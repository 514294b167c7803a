"""A stored image's encoder run ahead of its jobs (``POST /v1/images``): ``tasks/warm_image.py`` calls :func:`warm`.

The image's model runs its encoder alone (``ModelAdapter.warm``) and keeps the
outputs in the encoder cache, in this process and in the tier every worker
shares, under the tenant and the image's sha256: exactly where a job naming
the image looks (``workers/pipeline.py`` gives the job that ``image_id``). The
image's record then says ``ready`` and names the shared entry, so the web can
tell when the cache has let it go.

A failure here fails no job: the record says ``failed`` and why, and a job on
the image runs the encoder itself. So does a job that starts while this task
is still queued or running (on another process): nothing waits on this task.
"""

from __future__ import annotations

import logging
import time

from domain import keys
from domain.image_records import Encoding
from domain.images import decode_image
from models.adapters.base import SegmentRequest
from storage.retrying import RetryingStorage
from stores.images import ImageStore
from workers import process

log = logging.getLogger(__name__)


def warm(tenant: str, image_id: str, model: str) -> None:
    worker = process.current()
    settings = worker.settings
    images = ImageStore(worker.redis, settings.retention_s)
    record = images.get(tenant, image_id)
    if record is None:
        log.info("image %s: no record (expired or deleted); nothing to encode", image_id)
        return
    try:
        worker.models.refresh()
        choice = worker.models.choose(model, ("points",))
        if choice.degraded or not choice.adapter.can_warm():
            raise RuntimeError(choice.reason or f"model {model!r} has no image encoder to run ahead")
        storage = RetryingStorage.from_settings(worker.storage, settings)
        image = decode_image(
            storage.get(record.input_key), max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
        )
        request = SegmentRequest(image=image.pixels, image_id=image_id, scope=tenant)
        started = time.perf_counter()
        key = choice.adapter.warm(request)
        seconds = time.perf_counter() - started
    except Exception as exc:  # the image's jobs still run: they encode it themselves
        detail = getattr(exc, "detail", None) or f"{type(exc).__name__}: {exc}"
        log.warning("image %s: the encoder of model %s did not run ahead: %s", image_id, model, detail)
        images.set_encoding(tenant, image_id, Encoding.FAILED, error=detail)
        return
    # The shared tier's entry, when this worker has one (else only this process holds the encoding).
    shared = worker.models.encoder_cache.shared if key is not None else None
    encoding_key = keys.encoding(key.part, key.tenant or "", key.input) if key is not None and shared else None
    images.set_encoding(tenant, image_id, Encoding.READY, encoding_key=encoding_key, encode_s=seconds)
    cached = request.report.get("embedding", {}).get("cached")
    log.info("image %s: encoded ahead for model %s in %.3f s (cached already: %s)", image_id, model, seconds, cached)
