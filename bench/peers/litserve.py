"""LitServe: one inference worker with batching on (``PeerModels`` in it), on loopback."""

from __future__ import annotations

import argparse
import functools
import json

from bench.peers.common import PEER_BATCH, PEER_BATCH_WAIT_S, PeerStack, serve_command
from bench.peers.serving import PeerModels


def serve_litserve(port: int) -> None:
    """LitServe: one inference worker with batching on, on loopback; runs until stopped."""
    import litserve as ls

    api = _lit_api_class()(max_batch_size=PEER_BATCH, batch_timeout=PEER_BATCH_WAIT_S)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=False)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False, log_level="warning")


@functools.cache
def _lit_api_class():
    """The LitServe API class, made on first use (litserve is optional) and importable as
    ``bench.peers.litserve.SegmentAPI`` (LitServe pickles it into its inference worker process)."""
    import litserve as ls

    class SegmentAPI(ls.LitAPI):
        def setup(self, device):
            self.models = PeerModels()

        def decode_request(self, request):
            return request

        def batch(self, inputs):
            return list(inputs)

        def predict(self, payloads):
            return self.models.handle(payloads)

        def unbatch(self, output):
            return list(output)

        def encode_response(self, output):
            return json.loads(output)

    SegmentAPI.__module__, SegmentAPI.__qualname__ = __name__, "SegmentAPI"
    return SegmentAPI


def __getattr__(name: str):
    if name == "SegmentAPI":
        return _lit_api_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class LitServeStack(PeerStack):
    name = "litserve"

    def command(self) -> list[str]:
        return serve_command("litserve", "--port", str(self.port))


def main(argv: list[str]) -> int:
    """The server process (``LitServeStack.command``): ``--port N``, until stopped."""
    parser = argparse.ArgumentParser(prog="python -m bench.peers serve litserve")
    parser.add_argument("--port", type=int, required=True)
    serve_litserve(parser.parse_args(argv).port)
    return 0
