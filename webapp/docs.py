"""``/docs``: Swagger UI for ``/openapi.json``, served from the ``flask-swagger-ui`` wheel's own files.

Nothing is fetched from a CDN, so the page works on a machine with no way out.
"""
from __future__ import annotations

from flask import Flask
from flask_swagger_ui import get_swaggerui_blueprint

DOCS_PATH = "/docs"


def init_app(app: Flask) -> None:
    """Serve the docs page at ``/docs/`` (``/docs`` redirects there)."""
    app.register_blueprint(get_swaggerui_blueprint(
        DOCS_PATH, "/openapi.json",
        config={"app_name": "maskq API", "persistAuthorization": True, "tryItOutEnabled": True},
        blueprint_name="docs",
    ))
