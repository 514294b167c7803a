"""A folder through the service two ways: one job per image (``maskq segment``) against one server batch.

The service as ``make run`` starts it (one worker), the result cache off (every
image runs), the text model on the test images, cycled under names of their
own. Each round sends the same ``--jobs`` images both ways, alternating which
goes first:

- **per image**: ``maskq.Client.submit`` from 8 threads, each job then
  long-polled to its end (what ``maskq segment`` does);
- **server batch**: one ``POST /v1/batches``, then ``GET /v1/batches/{id}``
  every second until it completes (``maskq segment --server-batch``).

``accept_s`` is the time until every image was accepted (the client may walk
away), ``total_s`` until every job had ended, ``requests`` the HTTP requests
the client made. The worker is the bottleneck, so ``total_s`` should be near
equal, but for dynamic batching: a server batch puts every job on the lane at once, so a
worker whose model batches takes several at a time.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.common import Options, ServiceStack, load_images
from maskq.client import Client

REQUEST = {"model": "text-regions", "prompts": {"text": ["dataset"]}, "lane": "batch"}
OVERRIDES = {"result_cache_enabled": False}
THREADS = 8


class CountingClient(Client):
    """The client, counting the HTTP requests it makes (retries too)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests = 0
        self._lock = threading.Lock()

    def _call(self, method, path, **kwargs):
        with self._lock:
            self.requests += 1
        return super()._call(method, path, **kwargs)


def per_image(client: CountingClient, images: list[tuple[str, bytes]]) -> tuple[float, float]:
    started = time.perf_counter()
    accepted: list[float] = []

    def one(item: tuple[str, bytes]) -> str:
        job = client.submit(item[1], REQUEST, filename=item[0])
        accepted.append(time.perf_counter())
        return client.wait(job.id).status

    with ThreadPoolExecutor(THREADS) as pool:
        statuses = list(pool.map(one, images))
    if set(statuses) != {"succeeded"}:
        raise RuntimeError(f"per image: not every job succeeded: {statuses}")
    return max(accepted) - started, time.perf_counter() - started


def server_batch(client: CountingClient, images: list[tuple[str, bytes]]) -> tuple[float, float]:
    started = time.perf_counter()
    batch = client.submit_batch([data for _, data in images], REQUEST, names=[name for name, _ in images])
    accepted = time.perf_counter() - started
    batch = client.wait_batch(batch.id)  # polled each second, as `maskq segment --server-batch` does
    if batch.counts["succeeded"] != len(images):
        raise RuntimeError(f"server batch: {batch.counts}")
    return accepted, time.perf_counter() - started


def run(options: Options) -> list[dict]:
    base = load_images(options.images)
    count = max(options.jobs // 2, len(base))
    rounds = max(options.rounds // 2, 1)
    results: dict[str, list[tuple[float, float, int]]] = {"per image": [], "server batch": []}
    with ServiceStack(overrides=OVERRIDES) as stack:
        key = stack.headers.get("Authorization", " ").split(" ", 1)[1] or None
        warm = Client(stack.base_url, key)
        warm.segment(base[0][1], text="dataset", model="text-regions")  # the model loaded before measuring
        for number in range(rounds):
            images = [(f"r{number}-{i}-{base[i % len(base)][0]}", base[i % len(base)][1]) for i in range(count)]
            order = (("per image", per_image), ("server batch", server_batch))
            for case, way in order if number % 2 == 0 else order[::-1]:
                client = CountingClient(stack.base_url, key)
                accept_s, total_s = way(client, images)
                results[case].append((accept_s, total_s, client.requests))
    rows: list[dict[str, Any]] = []
    for case, runs in results.items():
        accept = sum(r[0] for r in runs) / len(runs)
        total = sum(r[1] for r in runs) / len(runs)
        rows.append(
            {
                "case": case,
                "images": count,
                "rounds": len(runs),
                "accept_s": round(accept, 3),
                "total_s": round(total, 2),
                "images_per_s": round(count / total, 2),
                "requests": round(sum(r[2] for r in runs) / len(runs)),
            }
        )
    per, batch = rows
    batch["accept_vs_per_image"] = round(batch["accept_s"] / per["accept_s"], 3)
    batch["total_vs_per_image"] = round(batch["total_s"] / per["total_s"], 3)
    return rows


if __name__ == "__main__":
    from bench.common import format_table

    print(format_table("folder runs: per image vs server batch", run(Options(jobs=20, rounds=2))))
