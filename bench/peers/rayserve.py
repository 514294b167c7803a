"""Ray Serve: one replica with ``@serve.batch`` (``PeerModels`` in it), on loopback."""

from __future__ import annotations

import argparse
import contextlib
import signal
import tempfile
import threading

from bench.common import ROOT
from bench.peers.common import PEER_BATCH, PEER_BATCH_WAIT_S, PeerStack, serve_command
from bench.peers.serving import PeerModels


def serve_ray(port: int, temp_dir: str) -> None:
    """Ray Serve: one replica with ``@serve.batch``, on loopback; runs until SIGTERM."""
    import asyncio

    import ray
    from ray import serve
    from starlette.responses import Response

    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=2,
        _temp_dir=temp_dir,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(num_replicas=1, max_ongoing_requests=2 * PEER_BATCH, ray_actor_options={"num_cpus": 1})
    class Segmenter:
        def __init__(self):
            self.models = PeerModels()

        @serve.batch(max_batch_size=PEER_BATCH, batch_wait_timeout_s=PEER_BATCH_WAIT_S)
        async def segment(self, payloads: list[dict]) -> list[bytes]:
            return await asyncio.to_thread(self.models.handle, payloads)

        async def __call__(self, request) -> Response:
            return Response(await self.segment(await request.json()), media_type="application/json")

    serve.run(Segmenter.bind(), route_prefix="/predict")  # type: ignore[attr-defined]  # a serve.deployment
    _until_stopped()
    with contextlib.suppress(Exception):
        serve.shutdown()
    ray.shutdown()


def _until_stopped() -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1):
        pass


class RayStack(PeerStack):
    name = "ray"

    def command(self) -> list[str]:
        return serve_command("rayserve", "--port", str(self.port), "--temp-dir", str(self.folder / "r"))


def main(argv: list[str]) -> int:
    """The server process (``RayStack.command``): ``--port N [--temp-dir D]``, until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m bench.peers serve ray")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--temp-dir", default=None)
    args = parser.parse_args(argv)
    serve_ray(args.port, args.temp_dir or tempfile.mkdtemp(prefix="rayp-"))
    return 0
