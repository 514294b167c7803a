"""SAM jobs end to end: the API, a real worker process serving the tiny exported SAM, storage and back.

The stack is isolated (its own Redis) so no other test's worker, which does
not load the tiny SAM, can take these jobs.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from domain.images import decode_image
from models.adapters.base import AdapterContext, ModelSpec, Prompts, RuntimeOptions, SegmentRequest
from models.adapters.sam import SamAdapter
from stores.fleet import live_workers
from tests.conftest import image_bytes
from tests.integration.helpers import decode, run_to_end, submit
from tests.integration.sam_fixtures import SAM_MODEL


@pytest.fixture
def sam_stack(isolated, tiny_sam, tmp_path):
    """An API client and one worker process, both reading a manifest that serves the tiny SAM."""
    manifest = tiny_sam.manifest(tmp_path / "models.toml")
    worker = isolated.worker("sam", MASKQ_MODELS_MANIFEST=manifest)
    return isolated.client(models_manifest=manifest), worker


def cache_stats(redis_client, worker, timeout: float = 10) -> dict[str, int]:
    """The worker's embedding-cache counters from its first heartbeat written after this call.

    A beat written while a job ran could show the job half counted.
    """
    since = time.time()
    pids = set(worker.children())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in live_workers(redis_client):
            if int(entry["id"].rsplit(":", 1)[1]) in pids and entry["at"] > since:
                return entry["embedding_caches"][SAM_MODEL]
        time.sleep(0.1)
    raise AssertionError(f"no heartbeat from worker {worker.name} in {timeout} s")


def local_mask(tiny_sam, data: bytes, prompts: Prompts) -> np.ndarray:
    """What the adapter gives in this process for the image as the worker decodes it."""
    spec = ModelSpec(
        SAM_MODEL,
        tiny_sam.version,
        "models.adapters.sam:SamAdapter",
        files={"encoder": str(tiny_sam.encoder), "decoder": str(tiny_sam.decoder)},
    )
    adapter = SamAdapter(spec)
    adapter.setup(AdapterContext(RuntimeOptions(intra_op_threads=2)))
    pixels = decode_image(data, max_bytes=len(data), max_pixels=10**8).pixels
    return adapter.segment([SegmentRequest(pixels, prompts)])[0][0].mask


def test_a_second_prompt_on_the_same_image_is_answered_without_running_the_encoder_again(sam_stack, isolated, tiny_sam):
    client, worker = sam_stack
    image = image_bytes("ch_en_num.jpg")  # 323 x 430
    first = run_to_end(client, image, {"model": SAM_MODEL, "prompts": {"points": [[310, 420, 1]]}})
    assert first["status"] == "succeeded", first
    assert first["model"] == {"name": SAM_MODEL, "version": tiny_sam.version}
    result = first["result"]
    assert (result["width"], result["height"]) == (323, 430)
    [instance] = result["instances"]
    assert instance["label"] == "points"
    mask = decode(instance["mask"])
    assert mask.shape == (430, 323) and mask.sum() == instance["area"]
    # The worker's mask is the adapter's own for the same pixels and prompt.
    local = local_mask(tiny_sam, image, Prompts(points=((310, 420, 1),)))
    assert (mask == local).mean() > 0.999
    stats = cache_stats(isolated.redis, worker)
    assert (stats["encoder_runs"], stats["misses"], stats["hits"]) == (1, 1, 0)

    second = run_to_end(client, image, {"model": SAM_MODEL, "prompts": {"boxes": [[10, 20, 200, 300]]}})
    assert second["status"] == "succeeded", second
    assert [i["label"] for i in second["result"]["instances"]] == ["box:0"]
    stats = cache_stats(isolated.redis, worker)
    assert (stats["encoder_runs"], stats["misses"], stats["hits"]) == (1, 1, 1)

    other = run_to_end(client, image_bytes("en.jpg"), {"model": SAM_MODEL, "prompts": {"points": [[5, 5, 1]]}})
    assert other["status"] == "succeeded", other
    stats = cache_stats(isolated.redis, worker)
    assert (stats["encoder_runs"], stats["misses"], stats["hits"]) == (2, 2, 1)


def test_a_text_prompt_is_refused_at_once_with_a_422_and_no_prompt_is_segment_everything(sam_stack):
    client, _ = sam_stack
    image = image_bytes("ch_en_num.jpg")
    refused = submit(client, image, {"model": SAM_MODEL, "prompts": {"text": ["price"]}})
    assert refused.status_code == 422
    assert refused.mimetype == "application/problem+json"
    assert "does not support text prompts" in refused.get_json()["detail"]

    everything = submit(client, image, {"model": SAM_MODEL, "points_per_side": 2})
    assert everything.status_code == 202, everything.get_json()
