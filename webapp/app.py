"""The Flask app factory: ``create_app(settings=None)``."""

from __future__ import annotations

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from config.celery import create_celery
from config.settings import Settings, load_settings
from models.catalog import LiveCatalog
from runtime import telemetry
from runtime.redis_connection import service_client
from storage import open_storage
from stores.jobs import JobStore
from stores.lanes import Lanes
from stores.webhooks import JobEvents
from webapp.errors import register_error_handlers
from webapp.services import Services
from webapp.submission import max_upload_bytes


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    app = Flask("maskq")
    # Base64 in JSON is 4/3 of the upload (an image or a clip, the larger bound); the rest is room for the JSON.
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes(settings) * 4 // 3 + 8 * 1024 * 1024
    app.config["MAX_FORM_MEMORY_SIZE"] = 8 * 1024 * 1024
    app.json.sort_keys = False  # type: ignore[attr-defined]  # Flask's DefaultJSONProvider, set above
    client = service_client(settings)
    job_store = JobStore(client, settings.job_ttl_s)
    # Follows the manifest file: a new model version is served without a restart (models/catalog.py).
    catalog = LiveCatalog(settings.models_manifest, settings.manifest_check_s, settings)
    app.extensions["maskq"] = Services(
        settings=settings,
        redis=client,
        jobs=job_store,
        lanes=Lanes(client, job_store, settings),
        storage=open_storage(settings),
        catalog=catalog,
        celery=create_celery(settings),
    )
    # Every move a request makes (a cancel, an expiry noticed on read) becomes the job's webhook event.
    job_store.on_moved = JobEvents(client, app.extensions["maskq"].celery)
    from webapp import batches, deliveries, events, health, images, jobs, metrics, models, page

    # Timed from the first hook to the last, so every answer (an auth failure, a 429) is counted.
    app.before_request(metrics.start_timer)
    app.after_request(metrics.count_request)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(images.bp)  # an image stored once, its encoder started at once (POST /v1/images)
    app.register_blueprint(batches.bp)
    app.register_blueprint(events.bp)  # live progress: Server-Sent Events
    app.register_blueprint(models.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(deliveries.bp)
    app.register_blueprint(page.bp)  # the click-to-segment page at /
    register_error_handlers(app)
    from webapp import auth, docs, limits, openapi

    # Auth first: before_request hooks run in order, and the rate limits count per API key.
    auth.init_app(app)
    limits.init_app(app, settings)
    app.register_blueprint(openapi.bp)
    docs.init_app(app)
    telemetry.instrument_web(app)  # OpenTelemetry, when installed and OTEL_EXPORTER_OTLP_ENDPOINT is set
    if settings.trusted_proxy_hops:
        # The client address (failed-auth and anonymous rate limits) from X-Forwarded-For, but only as many
        # hops back as there are proxies we run: anything further left was written by the client.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_hops)  # type: ignore[method-assign]
    return app
