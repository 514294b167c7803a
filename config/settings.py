"""The one settings object of maskq, built from ``MASKQ_*`` environment variables.

Nothing else in the code base reads the environment: entry points call
:func:`load_settings` once and pass the object (or the parts of it that are
needed) into constructors. Tests build ``Settings(...)`` directly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LANES = ("interactive", "default", "batch")


class Settings(BaseSettings):
    """Every knob of the service; each field is ``MASKQ_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="MASKQ_", frozen=True, extra="ignore")

    # Where things live. No redis_url means: start the embedded Redis.
    redis_url: str | None = None
    embedded_redis_port: int = 6390
    data_dir: Path = PROJECT_ROOT / "var"
    storage_dir: Path | None = None

    # The web front end.
    host: str = "127.0.0.1"
    port: int = 8000
    web_workers: int = 2
    web_threads: int = 16
    public_url: str | None = None

    # What an upload may be.
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_prompts: int = 64
    max_text_prompt_chars: int = 200
    max_wait_s: int = 30

    # Models and ONNX Runtime.
    models_manifest: Path = PROJECT_ROOT / "config" / "models.toml"
    ort_providers: Annotated[tuple[str, ...], NoDecode] = ("CPUExecutionProvider",)
    ort_intra_op_threads: int = 0
    ort_inter_op_threads: int = 1

    # Jobs and lanes.
    default_lane: str = "default"
    job_ttl_s: int = 7 * 24 * 3600
    job_soft_time_limit_s: float = 60
    job_hard_time_limit_s: float = 90
    visibility_timeout_s: int = 600
    worker_concurrency: int = 1
    worker_heartbeat_s: float = 5

    log_level: str = "INFO"

    @field_validator("ort_providers", mode="before")
    @classmethod
    def _split_providers(cls, value):
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @field_validator("default_lane")
    @classmethod
    def _known_lane(cls, value: str) -> str:
        if value not in LANES:
            raise ValueError(f"must be one of {', '.join(LANES)}")
        return value

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
    def broker_url(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.embedded_redis_port}/0"

    @property
    def storage_root(self) -> Path:
        return self.storage_dir or self.data_dir / "storage"


def load_settings(**overrides) -> Settings:
    """Settings from the environment, with ``overrides`` on top (for entry points and tests)."""
    return Settings(**overrides)
