"""A plain synchronous server: Flask under gunicorn, one ``sync`` worker holding the models (``PeerModels``),
the model called in the request."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.peers.common import PeerStack
from bench.peers.serving import PeerModels


def flask_app():
    """The plain synchronous server: gunicorn imports this (``bench.peers.flask:flask_app()``) in its worker."""
    from flask import Flask, Response, request

    models = PeerModels()
    app = Flask("peer")

    @app.post("/predict")
    def predict():
        return Response(models.handle([request.get_json()])[0], mimetype="application/json")

    return app


class FlaskStack(PeerStack):
    name = "flask"

    def command(self) -> list[str]:
        gunicorn = str(Path(sys.executable).with_name("gunicorn"))
        # One sync worker: one process with the models, one request at a time, like maskq's one worker.
        return [
            gunicorn,
            "-w",
            "1",
            "-k",
            "sync",
            "-b",
            f"127.0.0.1:{self.port}",
            "--timeout",
            "120",
            "--backlog",
            "2048",
            "--log-level",
            "warning",
            "bench.peers.flask:flask_app()",
        ]
