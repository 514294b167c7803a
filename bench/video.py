"""Video jobs (issue 28): the worker's peak memory for a short and a long clip, and frames a second through the
service against the raw model loop, in one run.

The clips are the test pan over ``coffee.png`` (``tests/support/clips.py``: 240 x 176, 8 fps, the window
moving back and forth), 10 s and 60 s long, the cup followed from a box on frame 0, every 4th frame taken
(``video.frame_stride``): 20 and 120 frames through the model, 80 and 480 decoded. Each clip runs on a
service of its own, as ``make run`` starts it (``ServiceStack``, ``config/models.toml``), so each worker's
pool process starts fresh: its peak resident memory (``VmHWM``) is read after its models are loaded
(``base``) and after the job (``peak``). If frames were held, or chunks kept, the 60 s clip's peak would
grow with its six times as many frames: the ratio of the two peaks is the figure (the issue asks ≤ 1.2).

Frames a second: through the service, the frames taken over the worker's run of the job (its document's
``started_at`` to ``finished_at``: decode, follow, store every chunk, assemble the result), and end to end
(submit to the ended job); the raw loop is the same tracker on the same frames in this process (decode and
``SamTracker.step``, nothing stored), so the difference is what the service adds.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import psutil
import requests

from bench.common import ENDED, Options, ServiceStack
from config.settings import Settings
from domain.schemas import PromptSet
from domain.videos import FrameSampler, VideoLimits, decode_frames, probe_video
from models.adapters.base import AdapterContext, RuntimeOptions
from models.adapters.sam import SamAdapter
from models.catalog import ModelCatalog
from models.video_tracking import SamTracker, prompted_objects
from tests.support import clips
from workers.pipeline import prompts_in_pixels

FPS = 8
STRIDE = 4
SHORT_S, LONG_S = 10, 60
REQUEST = {"prompts": {"boxes": [list(clips.cup_box(0))]}, "video": {"frame_stride": STRIDE}}


def clip(seconds: int) -> bytes:
    return clips.coffee_pan(seconds * FPS, "mp4", FPS)


def high_water_kb(pid: int) -> int:
    """The process's peak resident memory so far (``VmHWM``), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for process {pid}")


def pool_process(stack: ServiceStack) -> int:
    """The worker's one pool process (concurrency 1): the process that runs jobs."""
    children = psutil.Process(stack.processes["worker"].pid).children(recursive=True)
    pool = [c for c in children if c.children() == [] and "celery" in " ".join(c.cmdline())]
    if len(pool) != 1:
        raise RuntimeError(f"expected one pool process, found {[c.pid for c in pool]}")
    return pool[0].pid


def run_clip(data: bytes) -> dict:
    with ServiceStack(overrides={"result_cache_enabled": False}) as stack, requests.Session() as session:
        session.headers.update(stack.headers)
        pid = pool_process(stack)
        base = high_water_kb(pid)
        files: dict[str, tuple[str | None, bytes | str, str]] = {
            "image": ("clip.mp4", data, "video/mp4"),
            "request": (None, json.dumps(REQUEST), "application/json"),
        }
        started = time.perf_counter()
        answer = session.post(f"{stack.base_url}/v1/jobs", files=files, timeout=120)
        if answer.status_code != 202:
            raise RuntimeError(f"POST /v1/jobs answered {answer.status_code}: {answer.text[:500]}")
        job = answer.json()
        while job["status"] not in ENDED:
            job = session.get(f"{stack.base_url}/v1/jobs/{job['id']}", params={"wait": 30}, timeout=60).json()
        wall = time.perf_counter() - started
        if job["status"] != "succeeded":
            raise RuntimeError(f"the video job ended {job['status']}: {job.get('error')}")
        peak = high_water_kb(pid)
    ran = (_epoch(job["finished_at"]) - _epoch(job["started_at"])) if job["started_at"] else float("nan")
    frames = job["progress"]["frames_total"]
    [cup] = job["result"]["annotations"]
    return {
        "frames": frames,
        "decoded": job["result"]["video"]["frames"],
        "base_mb": round(base / 1024, 1),
        "peak_mb": round(peak / 1024, 1),
        "fps_worker": round(frames / ran, 2),
        "fps_end_to_end": round(frames / wall, 2),
        "cup_found": f"{sum(s is not None for s in cup['segmentations'])}/{frames}",
        "_metrics": job["metrics"],
    }


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def raw_loop(data: bytes) -> dict:
    """The same tracker on the same frames in this process: decode and follow, nothing stored or sent."""
    settings = Settings()
    spec = ModelCatalog.load(settings.models_manifest, settings.models_dir).spec("sam")
    adapter = SamAdapter(spec)
    adapter.setup(AdapterContext(RuntimeOptions.from_settings(settings)))
    limits = VideoLimits.from_settings(settings)
    info = probe_video(data, limits)
    tracker = SamTracker(adapter)
    objects = prompted_objects(prompts_in_pixels(PromptSet.model_validate(REQUEST["prompts"])))
    frames = 0
    started = time.perf_counter()
    for frame in decode_frames(data, info, limits, FrameSampler(STRIDE)):
        tracker.step(frame.index, frame.pixels, objects if frame.index == 0 else None)
        frames += 1
    return {"frames": frames, "fps_raw": round(frames / (time.perf_counter() - started), 2)}


def run(options: Options) -> list[dict]:
    short, long = clip(SHORT_S), clip(LONG_S)
    raw = raw_loop(short)
    rows = []
    for seconds, data in ((SHORT_S, short), (LONG_S, long)):
        row = {"clip": f"{seconds} s, 240x176 @ {FPS} fps, every {STRIDE}th frame", **run_clip(data)}
        rows.append(row)
    ratio = rows[1]["peak_mb"] / rows[0]["peak_mb"]
    rows[1]["peak_ratio_long_over_short"] = round(ratio, 3)
    rows.append(
        {"clip": f"raw loop ({SHORT_S} s clip, this process)", "frames": raw["frames"], "fps_raw": raw["fps_raw"]}
    )
    return rows


def summary(rows: list[dict]) -> list[str]:
    ratio = rows[1]["peak_ratio_long_over_short"]
    return [
        f"video: worker peak RSS {rows[0]['peak_mb']} MB (10 s) vs {rows[1]['peak_mb']} MB (60 s): ratio {ratio} "
        f"({'within' if ratio <= 1.2 else 'OVER'} 1.2); frames/s: worker {rows[0]['fps_worker']}, "
        f"raw loop {rows[2]['fps_raw']}"
    ]
