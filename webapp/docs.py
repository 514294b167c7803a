"""``/docs``: Swagger UI for ``/openapi.json``, served from the ``flask-swagger-ui`` wheel's own files.

Nothing is fetched from a CDN, so the page works on a machine with no way
out. The page itself is ours rather than the wheel's template, because that one
starts Swagger UI from an inline script, which a strict Content-Security-Policy
(scripts from this origin only) forbids: here the start-up is a script file of
its own. A key typed into "Authorize" stays in the tab's memory
(``persistAuthorization`` off): Swagger UI would otherwise keep it in
``localStorage``, readable by any script of this origin and by whoever uses the
browser next.
"""

from __future__ import annotations

import json
from pathlib import Path

import flask_swagger_ui
from flask import Blueprint, Flask, Response, send_from_directory

DOCS_PATH = "/docs"
SWAGGER_UI_FILES = Path(flask_swagger_ui.__file__).parent / "dist"

# Swagger UI's options (https://swagger.io/docs/open-source-tools/swagger-ui/usage/configuration/).
SWAGGER_UI_CONFIG = {
    "url": "/openapi.json",
    "dom_id": "#swagger-ui",
    "layout": "BaseLayout",  # no top bar: its logo brings an inline <style>, its box loads other documents
    "deepLinking": True,
    "tryItOutEnabled": True,
    "persistAuthorization": False,  # the key is not written to localStorage
    "validatorUrl": None,  # no badge fetched from validator.swagger.io
}

# Scripts and styles from this origin only, no inline script; images may be data: URLs, which
# swagger-ui.css uses for its icons.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>maskq API</title>
  <link rel="stylesheet" type="text/css" href="{DOCS_PATH}/index.css">
  <link rel="stylesheet" type="text/css" href="{DOCS_PATH}/swagger-ui.css">
  <link rel="icon" type="image/png" href="{DOCS_PATH}/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{DOCS_PATH}/swagger-ui-bundle.js"></script>
  <script src="{DOCS_PATH}/maskq-docs.js"></script>
</body>
</html>
"""

START_SCRIPT = f"""window.ui = SwaggerUIBundle(Object.assign({{
  presets: [SwaggerUIBundle.presets.apis],
  plugins: [SwaggerUIBundle.plugins.DownloadUrl],
}}, {json.dumps(SWAGGER_UI_CONFIG)}));
"""

bp = Blueprint("docs", __name__, url_prefix=DOCS_PATH)


@bp.get("/")
@bp.get("/index.html")
def page() -> Response:
    return Response(PAGE, mimetype="text/html", headers={"Cache-Control": "no-cache"})


@bp.get("/maskq-docs.js")
def start_script() -> Response:
    return Response(START_SCRIPT, mimetype="text/javascript", headers={"Cache-Control": "no-cache"})


@bp.get("/<path:name>")
def swagger_ui_file(name: str) -> Response:
    return send_from_directory(SWAGGER_UI_FILES, name)


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def init_app(app: Flask) -> None:
    """Serve the docs page at ``/docs/`` (``/docs`` redirects there)."""
    app.register_blueprint(bp)
