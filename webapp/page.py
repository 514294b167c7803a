"""The click-to-segment page: ``/`` and its files under ``/ui/static/`` (plain HTML, JS and CSS in ``webapp/static``).

No build step and nothing from a CDN: the page works on a machine with no way
out. It is a client of the public API like any other, with the key in its key
field. ``GET /ui/config`` tells it the settings it needs, and on a development
setup the development key, so there is nothing to paste (see :func:`dev_key_for`).

None of these routes is under ``/v1``, so none needs a key (``webapp/auth.py``).
"""
from __future__ import annotations

import ipaddress

from flask import Blueprint, Request, Response, jsonify, request

from webapp.cli import dev_key_path, dev_key_wanted
from webapp.services import services

bp = Blueprint("page", __name__, static_folder="static", static_url_path="/ui/static")

# Everything from this origin and nothing else: no inline script or style, no frames, no plug-ins.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
LOOPBACK_NAMES = {"localhost"}


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
    """What the page needs to know: the longest ``Prefer: wait``, and the development key where it may have it."""
    settings = services().settings
    key = dev_key_for(request)
    response = jsonify({"api_key": key, "key_source": "development" if key else None,
                        "max_wait_s": settings.max_wait_s})
    response.headers["Cache-Control"] = "no-store"
    return response


def dev_key_for(req: Request) -> str | None:
    """The development key, only to a browser on this machine talking to a development setup; else None.

    All of these must hold:

    - this setup makes a development key at all (:func:`webapp.cli.dev_key_wanted`: keys on, the
      embedded Redis, the web front end bound to a loopback address) and it is on file;
    - the request comes from a loopback address, straight (no ``Forwarded``/``X-Forwarded-For``: a
      proxy on this machine would make every outside caller look local);
    - its ``Host`` is a loopback name or address: a page of another site that got its name to resolve
      to 127.0.0.1 (DNS rebinding) asks with its own name in ``Host``;
    - the browser does not say it comes from another site (``Sec-Fetch-Site``).
    """
    settings = services().settings
    if dev_key_wanted(settings) is not None:
        return None
    if not _is_loopback(req.remote_addr or "") or "Forwarded" in req.headers or "X-Forwarded-For" in req.headers:
        return None
    if not _is_loopback(_host_name(req.host)):
        return None
    if req.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return None
    path = dev_key_path(settings)
    key = path.read_text().strip() if path.is_file() else ""
    return key or None


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _is_loopback(name: str) -> bool:
    if name.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
