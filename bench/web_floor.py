"""The web floor: the least a Flask front end can do to answer a cache hit, under maskq's own gunicorn settings.

``POST /v1/jobs`` reads the multipart ``image`` part (werkzeug's parser, as
maskq's), hashes it, and answers a constant job document that says
``cached``: no auth, no limiter, no Redis. ``bench/cache_hits.py`` drives it
with the same clients right after maskq, so its rate is the ceiling that any
Flask app served this way reaches on this machine, and maskq's hit rate is
read against it.

Run: ``gunicorn -k gthread --workers W --threads T -b HOST:PORT "bench.web_floor:create_app()"``.
"""

from __future__ import annotations

import hashlib

from flask import Flask, jsonify, request


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/v1/jobs")
    def hit():
        image = request.files["image"]
        digest = hashlib.sha256(image.read()).hexdigest()
        return jsonify({"id": digest[:32], "status": "succeeded", "cached": True, "result": {"instances": []}})

    return app
