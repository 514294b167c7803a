"""The connections one web process shares across requests, built by the app factory."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery
from flask import current_app

from config.settings import Settings
from models.catalog import LiveCatalog
from storage import Storage
from stores.jobs import JobStore
from stores.lanes import Lanes


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    jobs: JobStore
    lanes: Lanes
    storage: Storage
    catalog: LiveCatalog
    celery: Celery


def services() -> Services:
    found: Services = current_app.extensions["maskq"]
    return found
