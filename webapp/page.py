"""The click-to-segment page: ``/`` and its files under ``/ui/static/`` (plain HTML, JS and CSS in ``webapp/static``).

No build step and nothing from a CDN: the page works on a machine with no way
out. It is a client of the public API like any other, with the key in its key
field. ``GET /ui/config`` tells it the settings it needs, and never a key: who
asks cannot be told apart from here (a proxy, ``ssh -R`` or ``kubectl
port-forward`` on this machine makes a remote caller look like loopback). On a
development setup ``make run`` prints a link that carries the development key
in its fragment (``http://127.0.0.1:8000/#key=…``, ``stores/dev_key.py``), which
the browser never sends: the page reads it, keeps it for the tab's session and
takes it out of the address bar.

None of these routes is under ``/v1``, so none needs a key (``webapp/auth.py``).
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from webapp.services import services

bp = Blueprint("page", __name__, static_folder="static", static_url_path="/ui/static")

# Everything from this origin and nothing else: no inline script or style, no frames, no plug-ins; a video job's
# overlay plays from a blob: URL (fetched with the key, which a <video src> could not send).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self' blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


@bp.get("/")
def index() -> Response:
    """The page itself."""
    response = bp.send_static_file("index.html")
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/favicon.ico")
def favicon() -> Response:
    """No icon: an empty answer rather than a 404 problem in every browser's console."""
    return Response(status=204, headers={"Cache-Control": "max-age=86400"})


@bp.get("/ui/config")
def config() -> Response:
    """What the page needs to know: the longest ``Prefer: wait``. The same for every caller, and no key."""
    response = jsonify({"max_wait_s": services().settings.max_wait_s})
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
