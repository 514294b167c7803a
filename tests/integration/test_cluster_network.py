"""The cluster's building blocks on their own: namespace hosts (a partition cuts, a heal restores, nothing
leads out, nothing is left behind) and the link proxy (one direction cut, slow). Seconds each."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT, free_port, require
from tests.integration.helpers import wait_for

CONNECT = "import socket,sys;socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1.5);print('ok')"


@pytest.fixture
def network():
    from tests.cluster import network

    why = network.available()
    require(why is None, f"network namespaces: {why}")
    made = network.Network()
    yield made
    made.close()
    assert not [n for n in network.namespaces() if n.startswith(made.tag)]  # the namespaces are gone


def test_a_partition_at_the_switch_cuts_a_host_off_and_a_heal_plugs_it_back(network, tmp_path):
    a, b = network.add("a"), network.add("b")
    b.popen([sys.executable, "-m", "http.server", "8000", "--bind", b.address], tmp_path / "b.log")

    def reach(host, address, port=8000):
        answer = host.run([sys.executable, "-c", CONNECT, address, str(port)], capture_output=True, text=True)
        return answer.stdout.strip() == "ok", answer.stderr

    wait_for(lambda: reach(a, b.address)[0], 15)
    network.partition("b")
    reached, error = reach(a, b.address)
    assert not reached and "timed out" in error  # a pulled cable: no answer at all, not a refusal
    network.heal()
    assert reach(a, b.address)[0]
    reached, error = reach(a, "192.0.2.1", 80)  # anywhere off the test subnet: no route, nothing sent
    assert not reached and "Network is unreachable" in error
    b.kill()
    assert not b.pids()


def test_the_link_proxy_cuts_answers_only_and_slows_a_link(tmp_path):
    echo = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            conn, _ = echo.accept()
            threading.Thread(target=lambda c=conn: [c.sendall(d) for d in iter(lambda: c.recv(100), b"")]).start()

    threading.Thread(target=serve, daemon=True).start()
    mode, port = tmp_path / "mode", free_port()
    target = f"127.0.0.1:{echo.getsockname()[1]}"
    proxy = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.cluster.proxy",
            "--listen",
            f"127.0.0.1:{port}",
            "--to",
            target,
            "--mode-file",
            str(mode),
        ],
        cwd=ROOT,
    )

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait_for(listening, 10)

        def round_trip(payload: bytes, timeout: float = 2.0) -> bytes | None:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
                s.sendall(payload)
                try:
                    return s.recv(100)
                except TimeoutError:
                    return None

        assert round_trip(b"hello") == b"hello"
        mode.write_text("cut-replies")
        time.sleep(0.5)
        assert round_trip(b"one-way") is None  # the server got it (echoed), the answer never came back
        mode.write_text("slow 700")
        time.sleep(0.5)
        started = time.monotonic()
        assert round_trip(b"slow", timeout=5) == b"slow" and time.monotonic() - started >= 1.3  # 700 ms each way
        mode.write_text("cut")
        time.sleep(0.5)
        assert round_trip(b"nothing") is None
    finally:
        proxy.kill()
        proxy.wait()
