"""The one settings object of maskq, built from ``MASKQ_*`` environment variables.

Nothing else in the code base reads the environment: entry points call
:func:`load_settings` once and pass the object (or the parts of it that are
needed) into constructors. Tests build ``Settings(...)`` directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from config.task_names import LANES  # the lanes are queues: their names live with the other queue names

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# A MASKQ_REDIS_URL of this scheme names Sentinels, not a server (runtime/redis_connection.py connects through them).
SENTINEL = "sentinel://"


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL)


class Settings(BaseSettings):
    """Every knob of the service; each field is ``MASKQ_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="MASKQ_", frozen=True, extra="ignore")

    # Where things live. No redis_url means: start the embedded Redis.
    redis_url: str | None = None
    # With a sentinel:// redis_url: the name the Sentinels know the primary by (runtime/redis_connection.py).
    redis_sentinel_master: str = "mymaster"
    # A call to Redis from the web or a worker that gets no answer this long is an error, which the caller
    # rides out (workers/redis_outage.py) or answers with a 503. A partition drops packets without a word:
    # with no timeout a call waits for TCP to give up (about 15 min), holding its job or web thread.
    redis_socket_timeout_s: float = Field(default=10, gt=0)
    embedded_redis_port: int = 6390
    # On Ctrl-C the embedded Redis stops last: it waits (at most this long) until every worker process has
    # stopped, so a worker's warm shutdown can record its running job. `make run` (cli/procfile.py) lets
    # honcho wait this long and 10 s more before it kills what is left (honcho's own is 5 s).
    embedded_redis_stop_wait_s: float = Field(default=30.0, ge=0)
    data_dir: Path = PROJECT_ROOT / "var"
    storage_dir: Path | None = None

    # The web front end.
    host: str = "127.0.0.1"
    port: int = 8000
    web_workers: int = 2
    web_threads: int = 16
    public_url: str | None = None

    # Tenants, API keys and rate limits (webapp/auth.py, webapp/limits.py, domain/tenants.py).
    # auth "keys": every /v1 request needs `Authorization: Bearer <key>`; "off" (loopback only):
    # no keys, every request is tenant "default".
    auth: str = "keys"
    # On a loopback host with the embedded Redis, `make run` keeps a development key (tenant "dev")
    # in data_dir/dev-api-key and prints it.
    dev_key: bool = True
    default_rate: str = "600/minute"  # per API key, unless the key has its own
    global_rate: str = "6000/minute"  # every client together
    failed_auth_rate: str = "20/minute"  # failed authentications per client address; past it, 429 (key guessing)
    # Requests that carry no API key (the page, the docs, the OpenAPI document, 404s), per client address:
    # their own bucket, so they never spend a key's rate or the global one.
    anonymous_rate: str = "300/minute"
    # How many proxies in front (an ingress, a load balancer) set X-Forwarded-For: the client address is
    # taken that many hops back in it (werkzeug's ProxyFix). 0: the header is ignored, the peer is the client.
    trusted_proxy_hops: int = Field(default=0, ge=0)
    rate_limit_strategy: str = "fixed-window"
    idempotency_ttl_s: int = 24 * 3600
    # An Idempotency-Key held by a request still being handled lapses after this long without a sign of
    # life (a batch's fan-out renews it with each image), so a dead web process does not hold it for good.
    idempotency_pending_ttl_s: int = Field(default=60, ge=1)

    # What an upload may be.
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_prompts: int = 64
    max_text_prompt_chars: int = 200
    max_wait_s: int = 30
    # Long polls (?wait=N, Prefer: wait) one API key may hold at once: the web's threads are shared by all.
    max_waits_per_key: int = Field(default=8, ge=1)
    # Live event streams (GET /v1/jobs/{id}/events, /v1/batches/{id}/events) count as waits above; each is
    # closed after max_stream_s (the client reconnects with Last-Event-ID), and sends a comment every
    # stream_heartbeat_s so proxies do not cut it. A web process holds at most half its threads in streams.
    max_stream_s: int = Field(default=300, ge=1)
    stream_heartbeat_s: float = Field(default=15, gt=0)
    # Encoder outputs (SAM's image embeddings) shared by every worker process in Redis (models/encoder_cache.py), so a
    # second prompt on an image skips the encoder on any worker: bound in MB (0: off), TTL, fp16.
    shared_embeddings_mb: float = Field(default=512, ge=0)
    shared_embeddings_ttl_s: int = Field(default=3600, gt=0)
    shared_embeddings_fp16: bool = True
    # POST /v1/batches (domain/batches.py): images one batch may hold, and the bytes of its upload.
    max_batch_images: int = Field(default=500, ge=1)
    max_batch_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    # Batch uploads one web process handles at once (each holds about one image in memory, and its
    # upload on disk); past it, 503 with Retry-After before the body is read.
    max_concurrent_batch_uploads: int = Field(default=2, ge=1)
    # A batch whose upload was cut off (the web process died while it fanned out) is closed, with
    # the jobs it has, once it has gone this long without a new job (worker upkeep, or a read).
    batch_receive_timeout_s: float = Field(default=600, gt=0)
    # Segment-everything (SAM-family models, no prompt): the largest grid a request may ask for.
    max_points_per_side: int = Field(default=32, ge=1, le=64)
    # Video jobs (domain/videos.py): a clip's bytes, duration, frames and pixels per frame. Each is checked
    # from the container's header before a frame is decoded, and again while decoding (headers lie).
    max_video_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    max_video_duration_s: float = Field(default=120, gt=0)
    max_video_frames: int = Field(default=3600, ge=1)
    max_video_pixels: int = Field(default=1920 * 1080, ge=1)
    # Clips one web process reads and checks at once (each up to max_video_bytes in memory and a decode of
    # it end to end); past it, 503 with Retry-After before more than its first bytes are read (webapp/slots.py).
    max_concurrent_video_uploads: int = Field(default=2, ge=1)
    # A video job's frames are stored this many at a time (a chunk); a job whose worker died resumes
    # after its last stored chunk (workers/video_job.py).
    video_chunk_frames: int = Field(default=8, ge=1)
    # A video job's own time limits: a clip runs longer than an image. Below the visibility timeout, as
    # every hard limit; unset, 90 % of it (hard) and 90 % of that (soft): video_time_limits.
    video_soft_time_limit_s: float | None = Field(default=None, gt=0)
    video_hard_time_limit_s: float | None = Field(default=None, gt=0)

    # Models and ONNX Runtime.
    models_manifest: Path = PROJECT_ROOT / "config" / "models.toml"
    # Where fetched model files live (`make models`, models/fetch.py); "{models_dir}" in the manifest.
    models_dir: Path = PROJECT_ROOT / "var" / "models"
    # Where models run (workers/devices.py): "auto" (CUDA when onnxruntime-gpu and a GPU are there, else
    # CPU), "cuda" (a model that cannot get CUDA does not load), "cpu". `make install` installs the
    # matching onnxruntime build (tools/onnxruntime_build.py).
    device: str = "auto"
    # One worker process per GPU (workers/launch.py): "" (one worker, no pinning), "all", or NVML
    # indices / UUIDs ("0,1"). Each gets CUDA_VISIBLE_DEVICES=<its UUID>.
    gpus: str = ""
    # ONNX Runtime providers in order of preference; empty: by device (CUDA then CPU, or CPU).
    ort_providers: Annotated[tuple[str, ...], NoDecode] = ()
    # The CUDA arena gives its memory back after each run, so the resource gate reads what is really free.
    gpu_arena_shrinkage: bool = True
    # TensorRT engine and timing caches, per model version and GPU model (None: data_dir/trt).
    trt_cache_dir: Path | None = None
    ort_intra_op_threads: int = 0
    ort_inter_op_threads: int = 1

    # Model manifest hot reload (models/manifest.py): the web process and each worker pool process
    # stat the manifest at most this often, and re-read it when it changed; no restart needed.
    manifest_check_s: float = Field(default=2.0, gt=0)

    # Jobs and lanes.
    default_lane: str = "default"
    job_ttl_s: int = 7 * 24 * 3600
    job_soft_time_limit_s: float = 60
    job_hard_time_limit_s: float = 90
    visibility_timeout_s: int = 600
    unacked_restore_interval_s: float = 10
    worker_concurrency: int = 1
    # A second stop signal (Ctrl-C sends SIGINT to every process, and honcho SIGTERM as well) would be a cold
    # shutdown that kills the running job: Celery waits this long for it first (its "soft shutdown").
    # Raise it where the platform waits longer (docker compose stop_grace_period, Kubernetes' grace period).
    worker_soft_shutdown_s: float = Field(default=4.0, ge=0)
    # False for a worker that only delivers webhooks and applies retention (-Q webhooks): it loads no model.
    worker_loads_models: bool = True
    worker_heartbeat_s: float = 5
    # A worker host's own Prometheus series (workers/metrics.py): its main process serves them here (0: off).
    worker_metrics_port: int = Field(default=9808, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"

    # Scheduling: lane limits, aging, the resource gate, retries on out-of-memory.
    lane_max_depth: dict[str, int] = {"interactive": 1000, "default": 10000, "batch": 100000}
    lane_aging_s: float = 120
    lane_aging_max_promoted: int = Field(default=1, ge=1)
    scheduler_tick_s: float = 1.0
    gate_check_s: float = 1.0
    gate_reserve_mb: float = 512
    gpu_device_index: int = 0  # the CUDA ordinal among the visible devices (workers/devices.py maps it to NVML)
    oom_retries: int = 3
    oom_retry_delay_s: float = 10
    # A job started more often than this fails with code "attempts" (its process died every time).
    job_max_attempts: int = Field(default=5, ge=1)

    # Recovery (workers/recovery.py): every worker looks this often for running jobs that no live
    # process is running; one unclaimed for recovery_grace_s goes back to its lane.
    recovery_check_s: float = Field(default=5, gt=0)
    recovery_grace_s: float = Field(default=20, gt=0)

    # Dynamic batching (workers/batching.py): a worker running a job of a model whose adapter stacks
    # batches and whose manifest sets max_batch_size > 1 takes up to that many queued jobs of the model
    # from the same lane along (only while every higher lane is empty), waiting at most batch_wait_ms
    # for them to arrive.
    # batching=false turns it off for every model.
    batching: bool = True
    batch_wait_ms: float = Field(default=5, ge=0, le=1000)

    # Object storage: S3 or any S3-compatible store (MinIO, Ceph) when s3_bucket is set, else storage_root.
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_path_style: bool = False
    s3_presign_expiry_s: int = Field(default=3600, gt=0, le=7 * 24 * 3600)
    s3_multipart_threshold_bytes: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)
    s3_timeout_s: float = 5
    # A worker retries a job's reads and writes while storage is away, this long at most.
    storage_retry_bound_s: float = 30
    storage_retry_initial_s: float = 0.2
    storage_retry_max_s: float = 5

    # Webhooks (Standard Webhooks). No secret: one is generated and kept in Redis.
    webhook_secret: SecretStr | None = None
    webhook_timeout_s: float = 10
    # Pauses before the 2nd, 3rd, ... attempt (the spec's: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h).
    webhook_retry_schedule_s: Annotated[tuple[float, ...], NoDecode] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    webhook_retry_jitter: float = Field(default=0.1, ge=0, lt=1)
    webhook_retry_after_max_s: float = 36000
    # Networks (CIDR) a webhook URL may resolve to although they are not public.
    webhook_allowed_networks: Annotated[tuple[str, ...], NoDecode] = ()

    # Retention: jobs (records and objects) older than this are deleted by the beat task.
    retention_s: int = 7 * 24 * 3600
    retention_interval_s: float = 3600
    retention_partial_age_s: float = 3600

    # Result cache and coalescing (stores/result_cache.py): an identical job (same image bytes, prompts,
    # outputs, model version and tenant) is answered from the cache, or waits for the one in flight.
    result_cache_enabled: bool = True
    result_cache_ttl_s: int = Field(default=2 * 3600, gt=0)
    result_cache_max_entries: int = Field(default=100_000, gt=0)

    # The `maskq segment` command, a client of a running service.
    api_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None

    log_level: str = "INFO"
    # "text" (the default, for a terminal) or "json": one object per line, with the job's fields (runtime/logs.py).
    log_format: str = "text"

    @field_validator("ort_providers", mode="before")
    @classmethod
    def _split_providers(cls, value):
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @field_validator("log_format")
    @classmethod
    def _known_log_format(cls, value: str) -> str:
        if value not in ("text", "json"):
            raise ValueError("must be 'text' or 'json'")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("auto", "cuda", "cpu"):
            raise ValueError("must be 'auto', 'cuda' or 'cpu'")
        return value

    @field_validator("default_lane")
    @classmethod
    def _known_lane(cls, value: str) -> str:
        if value not in LANES:
            raise ValueError(f"must be one of {', '.join(LANES)}")
        return value

    @field_validator("lane_max_depth")
    @classmethod
    def _every_lane_limited(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = set(value) - set(LANES)
        if unknown:
            raise ValueError(f"unknown lanes {sorted(unknown)}")
        return {"interactive": 1000, "default": 10000, "batch": 100000, **value}

    @field_validator("auth")
    @classmethod
    def _known_auth(cls, value: str) -> str:
        if value not in ("keys", "off"):
            raise ValueError("must be 'keys' or 'off'")
        return value

    @field_validator("rate_limit_strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        strategies = ("fixed-window", "moving-window", "sliding-window-counter")
        if value not in strategies:
            raise ValueError(f"must be one of {', '.join(strategies)}")
        return value

    @field_validator("default_rate", "global_rate", "failed_auth_rate", "anonymous_rate")
    @classmethod
    def _readable_rate(cls, value: str) -> str:
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a rate limit; write it as COUNT/PERIOD, e.g. '600/minute'") from None
        return value

    @model_validator(mode="after")
    def _no_open_service_without_auth(self):
        # Anyone who can reach a non-loopback address could use the service, and see every job.
        if self.auth == "off" and not self.loopback:
            raise ValueError(
                f"MASKQ_AUTH=off is only allowed on a loopback address, and MASKQ_HOST is {self.host!r}: "
                "set MASKQ_AUTH=keys and create keys with `maskq keys create --tenant NAME`, "
                "or bind to 127.0.0.1"
            )
        return self

    @field_validator("webhook_retry_schedule_s", "webhook_allowed_networks", mode="before")
    @classmethod
    def _split_list(cls, value):
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        import ipaddress

        try:
            return tuple(str(ipaddress.ip_network(v, strict=False)) for v in value)
        except ValueError as exc:
            raise ValueError(f"not a network in CIDR form: {exc}") from None

    @field_validator("webhook_secret")
    @classmethod
    def _standard_webhooks_secret(cls, value: SecretStr | None) -> SecretStr | None:
        import base64
        import binascii

        if value is None:
            return value
        raw = value.get_secret_value()
        try:
            ok = raw.startswith("whsec_") and len(base64.b64decode(raw[6:], validate=True)) >= 24
        except (binascii.Error, ValueError):
            ok = False
        if not ok:
            raise ValueError("must be 'whsec_' followed by the base64 of at least 24 random bytes")
        return value

    @property
    def video_time_limits(self) -> tuple[float, float]:
        """``(soft, hard)`` seconds for a video job: as set, else 90 % of the visibility timeout and 90 % of that."""
        hard = self.video_hard_time_limit_s or self.visibility_timeout_s * 0.9
        return self.video_soft_time_limit_s or hard * 0.9, hard

    @model_validator(mode="after")
    def _video_limits_before_the_visibility_timeout(self):
        # As every hard limit (celery#5935): a video job still running would be handed to a second worker.
        soft, hard = self.video_time_limits
        if not soft < hard < self.visibility_timeout_s:
            raise ValueError(
                f"need MASKQ_VIDEO_SOFT_TIME_LIMIT_S ({soft:g}) < MASKQ_VIDEO_HARD_TIME_LIMIT_S ({hard:g}) < "
                f"MASKQ_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s})"
            )
        return self

    @model_validator(mode="after")
    def _storage_retries_end_before_the_job(self):
        # The retries run inside the job; past its soft time limit they would end as a timeout instead.
        if self.storage_retry_bound_s >= self.job_soft_time_limit_s:
            raise ValueError(
                f"MASKQ_STORAGE_RETRY_BOUND_S ({self.storage_retry_bound_s}) must be below "
                f"MASKQ_JOB_SOFT_TIME_LIMIT_S ({self.job_soft_time_limit_s})"
            )
        return self

    @model_validator(mode="after")
    def _attempts_outlast_oom_retries(self):
        if self.job_max_attempts <= self.oom_retries:
            raise ValueError(
                f"MASKQ_JOB_MAX_ATTEMPTS ({self.job_max_attempts}) must be above MASKQ_OOM_RETRIES "
                f"({self.oom_retries}), or out-of-memory retries would end as 'attempts'"
            )
        return self

    @model_validator(mode="after")
    def _visibility_outlasts_jobs(self):
        # A job still running when the broker's visibility timeout ends is
        # handed to a second worker (celery#5935): refuse such a configuration.
        if self.visibility_timeout_s <= self.job_hard_time_limit_s:
            raise ValueError(
                f"MASKQ_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must be longer than "
                f"MASKQ_JOB_HARD_TIME_LIMIT_S ({self.job_hard_time_limit_s}), or a running job "
                "would be delivered to a second worker"
            )
        if self.job_soft_time_limit_s >= self.job_hard_time_limit_s:
            raise ValueError("MASKQ_JOB_SOFT_TIME_LIMIT_S must be below MASKQ_JOB_HARD_TIME_LIMIT_S")
        return self

    @property
    def embedded(self) -> bool:
        """True when maskq starts and owns its Redis server."""
        return self.redis_url is None

    @property
    def loopback(self) -> bool:
        """True when the web front end binds to a loopback address only."""
        import ipaddress

        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

    @property
    def broker_url(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.embedded_redis_port}/0"

    @property
    def storage_root(self) -> Path:
        return self.storage_dir or self.data_dir / "storage"

    @property
    def trt_cache_path(self) -> Path:
        return self.trt_cache_dir or self.data_dir / "trt"


def load_settings(**overrides) -> Settings:
    """Settings from the environment, with ``overrides`` on top (for entry points and tests)."""
    return Settings(**overrides)
