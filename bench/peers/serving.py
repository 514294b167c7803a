"""The peers' side: maskq's adapters behind another server, the same code in every peer's process."""

from __future__ import annotations

import base64
import json
import types
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from domain.records import JobRecord
    from domain.schemas import JobRequest
    from storage import Storage


class PeerModels:
    """maskq's models as a worker sets them up, and one request's path through them, for a peer's process.

    A request is ``{"image": base64, "request": {...}}``, the ``request``
    part of ``POST /v1/jobs``; the answer is what a job's ``result.json``
    holds (``store_result`` writes it, into memory here).
    """

    def __init__(self):
        from config.settings import load_settings
        from models.adapters.base import RuntimeOptions
        from models.catalog import ModelCatalog
        from workers.loaded_models import LoadedModels

        self.settings = load_settings()
        self.catalog = ModelCatalog.from_settings(self.settings)
        self.models = LoadedModels(self.catalog, RuntimeOptions.from_settings(self.settings))
        self.models.load_all()
        if self.models.failures:
            raise RuntimeError(f"models failed to load: {self.models.failures}")

    def handle(self, payloads: list[dict]) -> list[bytes]:
        """One batch of requests: each one's ``result.json`` (or ``{"error": ...}``), in order."""
        from domain.images import decode_image
        from domain.schemas import parse_request
        from models.adapters.base import SegmentRequest
        from workers.pipeline import store_result, to_prompts

        out: list[bytes | None] = [None] * len(payloads)
        groups: dict[str, list[tuple[int, SegmentRequest, JobRequest]]] = {}
        for i, payload in enumerate(payloads):
            try:
                request = parse_request(payload.get("request") or {})
                image = decode_image(
                    base64.b64decode(payload["image"]),
                    max_bytes=self.settings.max_image_bytes,
                    max_pixels=self.settings.max_image_pixels,
                )
                options = {"points_per_side": request.points_per_side} if request.points_per_side else {}
                segment = SegmentRequest(image=image.pixels, prompts=to_prompts(request), options=options)
                model = request.model or self.catalog.route(request.prompts.kinds)
                groups.setdefault(model, []).append((i, segment, request))
            except Exception as exc:
                out[i] = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
        for model, items in groups.items():
            try:
                adapter = self.models.choose(model, items[0][1].prompts.kinds).adapter
                results = adapter.segment([segment for _, segment, _ in items])
            except Exception as exc:
                for i, _, _ in items:
                    out[i] = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
                continue
            for (i, segment, request), instances in zip(items, results):
                memory = _MemoryStorage()
                key = store_result(
                    cast("JobRecord", types.SimpleNamespace(tenant="peer", id=f"r{i}", media="image")),  # what it reads
                    request,
                    segment.image,
                    instances,
                    cast("Storage", memory),  # put() is all it calls
                    segment.report,
                )
                out[i] = memory.files[key]
        return cast("list[bytes]", out)  # every request answered


class _MemoryStorage:
    """Just enough of ``storage.Storage`` for ``store_result``: what it writes stays in memory."""

    def __init__(self):
        self.files: dict[str, bytes] = {}

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.files[key] = data
