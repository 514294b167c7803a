"""A small TCP proxy for the faults a switch port cannot make: one pair of hosts cut, one direction cut, slow links.

``python -m tests.cluster.proxy --listen ADDR:PORT --to ADDR:PORT --mode-file F``
forwards every connection to ``--to`` and reads its mode from ``F`` (every
0.2 s; a missing file is ``pass``):

- ``pass``: bytes flow both ways;
- ``cut``: nothing flows either way, on open connections and new ones (they
  are accepted and then hang, as across a partition: no reset, no refusal);
- ``cut-replies``: requests reach the server, its answers never come back
  (one direction);
- ``slow MS``: every chunk waits MS milliseconds each way.

A host's clients reach one peer through it (``tests/cluster/cluster.py``
sends the web's S3 traffic through one in the ``s3`` host), so that pair
alone can be cut while the host still sees everything else.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from pathlib import Path


class Mode:
    def __init__(self, path: Path):
        self.path = path
        self.value = "pass"
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            try:
                self.value = self.path.read_text().strip() or "pass"
            except OSError:
                self.value = "pass"
            time.sleep(0.2)

    def blocks(self, direction: str) -> bool:
        return self.value == "cut" or (self.value == "cut-replies" and direction == "reply")

    def delay_s(self) -> float:
        return float(self.value.split()[1]) / 1000 if self.value.startswith("slow ") else 0.0


def pump(source: socket.socket, sink: socket.socket, mode: Mode, direction: str) -> None:
    try:
        while True:
            chunk = source.recv(65536)
            if not chunk:
                break
            while mode.blocks(direction):  # held, never dropped silently on a live stream: as a dead link
                time.sleep(0.1)
            if delay := mode.delay_s():
                time.sleep(delay)
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listen: tuple[str, int], target: tuple[str, int], mode: Mode) -> None:
    server = socket.create_server(listen, reuse_port=True)
    while True:
        client, _ = server.accept()

        def connect(client: socket.socket = client) -> None:
            while mode.blocks("request"):
                time.sleep(0.1)
            try:
                upstream = socket.create_connection(target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                return
            threading.Thread(target=pump, args=(client, upstream, mode, "request"), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client, mode, "reply"), daemon=True).start()

        threading.Thread(target=connect, daemon=True).start()


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=address, required=True)
    parser.add_argument("--to", type=address, required=True)
    parser.add_argument("--mode-file", type=Path, required=True)
    args = parser.parse_args()
    serve(args.listen, args.to, Mode(args.mode_file))


if __name__ == "__main__":
    main()
