"""What the embedding cache saves: a first prompt on an image against a second prompt on it.

The tiny random SAM (``tools/export_sam.py --tiny-random``, exported into a
temporary folder; needs ``requirements-sam.txt``) runs through the SAM adapter
in this process, set up with the deployment's ONNX Runtime settings. Each
round takes a new image id, so its first prompt (a point) misses the cache
and runs the encoder and the decoder; its second prompt (a box) hits and runs
only the decoder. Latency is ``adapter.segment`` end to end (preprocess,
predict, postprocess) on one decoded test image. Bare encoder and decoder
runs are timed too, to show where the time goes.

``sam_second_over_first`` = median second-prompt latency ÷ median first-prompt
latency. The tiny model's encoder is a 2-layer ViT while its decoder has SAM's
real size, so the ratio here is far higher than with real weights, whose
encoder is most of the work.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import ROOT, Options, load_images, percentile
from config.settings import load_settings
from domain.images import decode_image
from models.adapters.base import AdapterContext, ModelSpec, Prompts, RuntimeOptions, SegmentRequest
from models.adapters.onnx import create_session
from models.adapters.sam import SamAdapter

FIRST = "first prompt (encoder + decoder)"
SECOND = "second prompt (cached embedding, decoder only)"
MAX_ROUNDS = 20  # each round costs an encoder run; 20 keep the benchmark under a minute here


def export_tiny_sam(folder: Path) -> dict[str, str]:
    subprocess.run(
        [sys.executable, "tools/export_sam.py", "--tiny-random", "--no-check", str(folder)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return {"encoder": str(folder / "encoder.onnx"), "decoder": str(folder / "decoder.onnx")}


def timing_row(case: str, seconds: list[float], **extra) -> dict:
    return {
        "case": case,
        "runs": len(seconds),
        **{f"p{q}_ms": round(percentile(seconds, q) * 1000, 1) for q in (50, 95)},
        **extra,
    }


def run(options: Options) -> list[dict]:
    settings = load_settings()
    runtime = RuntimeOptions.from_settings(settings)
    name, data = next(
        ((n, d) for n, d in load_images(options.images) if n == "ch_en_num.jpg"), load_images(options.images)[0]
    )
    image = decode_image(data, max_bytes=len(data), max_pixels=settings.max_image_pixels).pixels
    h, w = image.shape[:2]
    point = Prompts(points=((w * 0.7, h * 0.6, 1),))
    box = Prompts(boxes=((w * 0.1, h * 0.1, w * 0.5, h * 0.5),))
    with tempfile.TemporaryDirectory(prefix="maskq-bench-sam-") as folder:
        spec = ModelSpec(
            "sam-tiny", "tiny-random-0", "models.adapters.sam:SamAdapter", files=export_tiny_sam(Path(folder))
        )
        adapter = SamAdapter(spec)
        adapter.setup(AdapterContext(runtime))
        rounds = max(1, min(options.jobs, MAX_ROUNDS))
        first, second = [], []
        for i in range(min(options.warmup, 3) + rounds):
            image_id = uuid.uuid4().hex
            timings = []
            for prompts in (point, box):
                started = time.perf_counter()
                adapter.segment([SegmentRequest(image, prompts, image_id=image_id)])
                timings.append(time.perf_counter() - started)
            if i >= min(options.warmup, 3):
                first.append(timings[0])
                second.append(timings[1])
        encoder, decoder = bare_timings(spec, runtime, adapter, image, rounds)
    assert adapter.embedding_cache is not None  # set up above
    stats = adapter.embedding_cache.stats()
    ratio = percentile(second, 50) / percentile(first, 50)
    return [
        timing_row(FIRST, first, image=f"{name} {w}x{h}"),
        timing_row(SECOND, second, image=f"{name} {w}x{h}", second_over_first=round(ratio, 3)),
        timing_row("bare encoder run", encoder),
        timing_row("bare decoder run (1 prompt set)", decoder, _cache=stats),
    ]


def bare_timings(spec: ModelSpec, runtime: RuntimeOptions, adapter: SamAdapter, image, rounds: int):
    """The encoder and the decoder alone (sessions of their own), on the inputs the adapter builds."""
    encoder_session = create_session(spec.files["encoder"], runtime)
    decoder_session = create_session(spec.files["decoder"], runtime)
    items, _ = adapter.preprocess([SegmentRequest(image, Prompts(points=((1, 1, 1),)), image_id=uuid.uuid4().hex)])
    assert items[0].encoder_input is not None  # a new image: the encoder's input is made
    encoder_input = {encoder_session.get_inputs()[0].name: items[0].encoder_input}
    encoder, decoder = [], []
    for _ in range(rounds + 1):  # the first run of a session allocates; it is not counted
        started = time.perf_counter()
        embedding = encoder_session.run(None, encoder_input)[0]
        encoder.append(time.perf_counter() - started)
        feeds = dict(items[0].calls[0].feeds, image_embeddings=embedding)
        started = time.perf_counter()
        decoder_session.run(["iou_predictions", "low_res_masks"], feeds)
        decoder.append(time.perf_counter() - started)
    return encoder[1:], decoder[1:]


def summary(rows: list[dict]) -> list[str]:
    ratio = next(r["second_over_first"] for r in rows if r["case"] == SECOND)
    return [f"sam_second_over_first={ratio}"]
