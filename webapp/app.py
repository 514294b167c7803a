"""The Flask app factory: ``create_app(settings=None)``."""
from __future__ import annotations

import redis
from flask import Flask

from config.celery import create_celery
from config.settings import Settings, load_settings
from storage import open_storage
from tasks.records import JobStore
from webapp.errors import register_error_handlers
from webapp.services import Services
from workers.registry import ModelCatalog


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    app = Flask("maskq")
    # Base64 in JSON is 4/3 of the image; the rest is room for the request JSON.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_image_bytes * 4 // 3 + 8 * 1024 * 1024
    app.config["MAX_FORM_MEMORY_SIZE"] = 8 * 1024 * 1024
    app.json.sort_keys = False
    client = redis.Redis.from_url(settings.broker_url, socket_timeout=10, socket_connect_timeout=5)
    app.extensions["maskq"] = Services(
        settings=settings,
        redis=client,
        jobs=JobStore(client, settings.job_ttl_s),
        storage=open_storage(settings),
        catalog=ModelCatalog.load(settings.models_manifest),
        celery=create_celery(settings),
    )
    from webapp import health, jobs, models

    app.register_blueprint(jobs.bp)
    app.register_blueprint(models.bp)
    app.register_blueprint(health.bp)
    register_error_handlers(app)
    return app
