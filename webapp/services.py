"""The connections one web process shares across requests, built by the app factory."""
from __future__ import annotations

from dataclasses import dataclass

import redis
from flask import current_app

from config.settings import Settings
from storage import Storage
from domain.lanes import Lanes
from domain.records import JobStore
from models.catalog import LiveCatalog


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    jobs: JobStore
    lanes: Lanes
    storage: Storage
    catalog: LiveCatalog
    celery: object


def services() -> Services:
    return current_app.extensions["maskq"]
