"""``maskq segment FOLDER``: a data team's run over a folder of images, written as COCO, JSON lines or PNGs.

A client of the HTTP API like any other (:class:`maskq.Client`), in one of two modes:

- **per image** (the default): each image is one ``POST /v1/jobs`` with an
  ``Idempotency-Key`` derived from the image and its request, so running the
  command again after an interruption picks up the same jobs instead of
  submitting them twice; ``concurrency`` jobs are in flight at once;
- **server batch** (``--server-batch``): the folder goes up in
  ``POST /v1/batches`` requests (``BATCH_CHUNK`` images each, keyed the same
  way), and the server fans them out and keeps the count; the command
  follows ``GET /v1/batches/{id}``.

Either way an image the service refuses is reported and skipped, never fatal,
and the outcome is a list of :class:`Item`, which the writers turn into the
chosen format (the COCO writer is the command's, ``cli/main.py``: that file's
format is the service's own, ``domain/coco.py``).

Part of the client: it imports none of the service's packages (an
import-linter contract). Only the PNG writer needs numpy, Pillow and
pycocotools, and the bar on a terminal tqdm.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from maskq.client import ENDED, ApiError, Batch, Client, Document

if TYPE_CHECKING:
    from tqdm import tqdm

BATCH_CHUNK = 200  # images per POST /v1/batches (the server's MASKQ_MAX_BATCH_IMAGES is 500 by default)


@dataclass(frozen=True)
class Item:
    """One image of a run: its file name, and its ended job's document or why it has none."""

    file_name: str
    job: Document | None = None
    error: str | None = None


def find_images(folder: Path, suffixes: Collection[str]) -> list[Path]:
    """Every file under ``folder`` whose suffix (lower case) is one of ``suffixes``, in name order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def read_prompts_file(path: Path) -> dict[str, Document]:
    """Per-image prompts by file name (relative to the folder), from JSON lines or CSV.

    JSON lines: ``{"file": "a/b.jpg", "points": [[x, y, 1]], "boxes": [...], "text": [...]}`` (or the prompts
    under ``"prompts"``). CSV: a ``file`` column and any of ``text`` (several joined by ``|``), ``points`` and
    ``boxes`` (JSON arrays).
    """
    text = path.read_text(encoding="utf-8")
    prompts: dict[str, Document] = {}
    if path.suffix.lower() == ".csv":
        for row in csv.DictReader(io.StringIO(text)):
            entry: Document = {}
            if row.get("text"):
                entry["text"] = [t for t in row["text"].split("|") if t]
            for kind in ("points", "boxes"):
                if row.get(kind):
                    entry[kind] = json.loads(row[kind])
            prompts[row["file"]] = entry
        return prompts
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name = entry.pop("file")
        except (ValueError, KeyError, AttributeError):
            raise ValueError(f'{path}:{number}: each line must be a JSON object with a "file"') from None
        prompts[name] = entry.pop("prompts", entry)
    return prompts


def run_key(data: bytes, request: Document) -> str:
    """The ``Idempotency-Key`` of one image's job: the same image and request, the same job."""
    return hashlib.sha256(data + b"\0" + json.dumps(request, sort_keys=True).encode()).hexdigest()


def segment_each(
    client: Client,
    folder: Path,
    paths: list[Path],
    request: Document,
    prompts: dict[str, Document],
    concurrency: int,
    progress: Progress,
) -> list[Item]:
    """One job per image, ``concurrency`` at a time; the outcomes in the folder's order."""

    def one(path: Path) -> Item:
        name = str(path.relative_to(folder))
        body = {**request, "prompts": prompts[name]} if name in prompts else request
        data = path.read_bytes()
        try:
            job = client.submit(data, body, filename=path.name, idempotency_key=run_key(data, body))
            job = job if job.ended else client.wait(job.id)
        except ApiError as exc:
            return Item(name, error=str(exc))
        return Item(name, job=job.document)

    items: dict[Path, Item] = {}
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(one, path): path for path in paths}
        for future in as_completed(futures):
            item = items[futures[future]] = future.result()
            progress.advance(item)
    return [items[path] for path in paths]


def segment_on_server(
    client: Client, folder: Path, paths: list[Path], request: Document, prompts: dict[str, Document], progress: Progress
) -> list[Item]:
    """The folder as server-side batches; their jobs' documents once every job has ended."""
    items: dict[str, Item] = {}
    for start in range(0, len(paths), BATCH_CHUNK):
        chunk = paths[start : start + BATCH_CHUNK]
        names = [str(p.relative_to(folder)) for p in chunk]
        files = [(name, p.read_bytes()) for name, p in zip(names, chunk)]
        chunk_prompts = {name: prompts[name] for name in names if name in prompts}
        # The same images under the same names, request and prompts: the same batch (a rerun resumes it).
        key = run_key(
            b"".join(hashlib.sha256(data).digest() for _, data in files),
            {"names": names, "request": request, "prompts": chunk_prompts},
        )
        try:
            batch = client.submit_batch(
                [data for _, data in files], request, prompts=chunk_prompts, idempotency_key=key, names=names
            )
        except ApiError as exc:  # the whole chunk refused (every image bad, too large a request)
            for name in names:
                items[name] = Item(name, error=str(exc))
                progress.advance(items[name])
            continue
        for rejected in batch.document["rejected"]:
            items[rejected["file_name"]] = Item(
                rejected["file_name"], error=f"{rejected['status']}: {rejected['detail']}"
            )
            progress.advance(items[rejected["file_name"]])
        seen: set[str] = set()

        def follow(now: Batch, seen: set[str] = seen) -> None:
            for job in now.document["jobs"]:
                if job["status"] in ENDED and job["id"] not in seen:
                    seen.add(job["id"])
                    progress.advance(
                        Item(job["file_name"], error=None if job["status"] == "succeeded" else job["status"])
                    )

        batch = client.wait_batch(batch.id, progress=follow)
        for job in batch.document["jobs"]:
            items[job["file_name"]] = Item(job["file_name"], job=client.get(job["id"]).document)
    return [items[str(p.relative_to(folder))] for p in paths]


# -- writers ------------------------------------------------------------------------------------------
def write_jsonl(items: list[Item], out: Path) -> None:
    """One line per image: its file name and its job (or its error), in the folder's order."""
    with out.open("w", encoding="utf-8") as lines:
        for item in items:
            line = (
                {"file_name": item.file_name, "job": item.job}
                if item.job
                else {"file_name": item.file_name, "error": item.error}
            )
            lines.write(json.dumps(line, ensure_ascii=False) + "\n")


def write_pngs(items: list[Item], out: Path) -> None:
    """``OUT/<image path without suffix>/<n>.png``: each instance's mask (255 inside), and ``instances.json``."""
    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils

    for item in items:
        if not item.job or item.job.get("status") != "succeeded":
            continue
        folder = out / Path(item.file_name).with_suffix("")
        folder.mkdir(parents=True, exist_ok=True)
        instances = item.job["result"]["instances"]
        for number, instance in enumerate(instances):
            rle = dict(instance["mask"], counts=instance["mask"]["counts"].encode())
            pixels = mask_utils.decode(rle).astype(np.uint8) * 255
            Image.fromarray(pixels, mode="L").save(folder / f"{number}.png")
        described = [
            {k: v for k, v in i.items() if k not in ("mask", "png_url")} | {"png": f"{n}.png"}
            for n, i in enumerate(instances)
        ]
        (folder / "instances.json").write_text(
            json.dumps({"job_id": item.job["id"], "instances": described}, ensure_ascii=False, indent=1)
        )


class Progress:
    """A bar (done/total, rate, ETA, failures) on a terminal; one plain line per image when piped."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total, self.done, self.failed, self.stream = total, 0, 0, stream
        self.started = time.monotonic()
        self.bar: tqdm[Any] | None = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", file=stream, dynamic_ncols=True)

    def advance(self, item: Item) -> None:
        self.done += 1
        self.failed += bool(item.error)
        if self.bar is not None:
            self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(1)
            return
        rate = self.done / max(time.monotonic() - self.started, 1e-6)
        eta = (self.total - self.done) / rate if rate else 0
        print(
            f"[{self.done}/{self.total}] {item.file_name}: {item.error or 'ok'} "
            f"({rate:.2f} img/s, eta {eta:.0f} s, {self.failed} failed)",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
