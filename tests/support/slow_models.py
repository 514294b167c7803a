"""The real text-regions model, made slow on purpose or declared to batch, for scheduling and batching tests.

- ``options.delay_s``: every inference call first sleeps this long (a job that
  stays ``running`` long enough to be canceled, killed or timed out).
- ``options.batch_delay_s``: a call given more than one request sleeps this
  long (a batch that is still running when a test strikes).

:class:`StuckTextRegionsAdapter` sleeps through its soft time limit (a job only the hard limit stops).

:class:`BatchingTextRegionsAdapter` declares ``stacks_batches`` so that the
batching machinery (claims, recovery, isolation) runs on the real model; it
still loops image by image, as its parent does.
"""

from __future__ import annotations

import time
from pathlib import Path

from models.adapters.text_regions import TextRegionsAdapter, TextRegionsOptions

SLOW = "tests.support.slow_models:SlowTextRegionsAdapter"
STUCK = "tests.support.slow_models:StuckTextRegionsAdapter"
BATCHING = "tests.support.slow_models:BatchingTextRegionsAdapter"
# The bundled model's name and version, so a slow worker's jobs look like the web's (result-cache keys agree).
NAME, VERSION = "text-regions", "pp-ocrv4-det+rec"


class SlowOptions(TextRegionsOptions):
    delay_s: float = 0
    batch_delay_s: float = 0


class SlowTextRegionsAdapter(TextRegionsAdapter):
    Options = SlowOptions

    def preprocess(self, requests):
        delay = float(self.spec.options.get("delay_s", 0))
        if len(requests) > 1:
            delay += float(self.spec.options.get("batch_delay_s", 0))
        if delay:
            time.sleep(delay)
        return super().preprocess(requests)


class StuckTextRegionsAdapter(SlowTextRegionsAdapter):
    """Sleeps ``delay_s`` through its soft time limit, as a model stuck in native code does: only the hard
    limit (the pool process killed) stops it."""

    def preprocess(self, requests):
        from celery.exceptions import SoftTimeLimitExceeded

        end = time.monotonic() + float(self.spec.options.get("delay_s", 0))
        while (left := end - time.monotonic()) > 0:
            try:
                time.sleep(left)
            except SoftTimeLimitExceeded:
                continue
        return TextRegionsAdapter.preprocess(self, requests)


class BatchingTextRegionsAdapter(SlowTextRegionsAdapter):
    stacks_batches = True


def slow_manifest(
    folder: Path,
    delay_s: float = 0,
    *,
    batch_delay_s: float = 0,
    adapter: str = SLOW,
    max_batch_size: int = 1,
    names: tuple[str, ...] = (NAME,),
) -> Path:
    """A manifest serving ``names`` on the slow (or batching) adapter; returns its path."""
    path = Path(folder) / f"slow-models-{delay_s}-{batch_delay_s}-{max_batch_size}.toml"
    tables = [
        f'[models.{name}]\nversion = "{VERSION}"\nadapter = "{adapter}"\nmax_batch_size = {max_batch_size}\n'
        f"options = {{ delay_s = {delay_s}, batch_delay_s = {batch_delay_s} }}\n"
        for name in names
    ]
    path.write_text(f'default = "{names[0]}"\n' + "".join(tables))
    return path
