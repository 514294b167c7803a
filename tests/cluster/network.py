"""Hosts on one machine: each a network namespace of its own, all on one bridge whose switch has a namespace too.

Every host gets one veth into the switch's bridge, an address on ``SUBNET``
and no other route: from inside a host, anything off the test subnet is
``Network is unreachable``, so no test traffic can ever reach a real network.
Faults are made on the switch side only (never in the root namespace, where
a removed route falls back to the default one: FIELD-NOTES):

- :meth:`Network.partition` sets a host's switch port down (both directions
  cut; connects and sends time out, as a pulled cable does) and
  :meth:`Network.heal` sets it up again;
- :meth:`Host.kill` SIGKILLs every process in the host's namespace.

Namespaces are named ``mq<tag>-<host>`` with the owning process's pid in the
tag; :func:`remove_stale` deletes those of owners that died without
cleaning up. :meth:`Network.close` ends every process in every host and
deletes the namespaces (and with them the veths and the bridge).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

PREFIX = "mqc"
SUBNET = ipaddress.ip_network("10.29.0.0/24")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_NET_ADMIN"
    probe = f"{PREFIX}probe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


def namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def pids_in(namespace: str) -> list[int]:
    answer = _ip("netns", "pids", namespace, check=False)
    return [int(p) for p in answer.stdout.split()]


def kill_all_in(namespace: str) -> None:
    """SIGKILL every process in ``namespace``, until none is left (a dying process may fork)."""
    for _ in range(50):
        pids = pids_in(namespace)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def remove_stale() -> list[str]:
    """Delete the namespaces of earlier runs whose owning process is gone; return their names."""
    removed = []
    for name in namespaces():
        match = re.fullmatch(rf"{PREFIX}(\d+)x\w+-[\w-]+", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            kill_all_in(name)
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    return removed


class Host:
    """One host: a namespace with ``eth0`` on the switch at ``address``."""

    def __init__(self, network: Network, name: str, index: int):
        self.network = network
        self.name = name
        self.namespace = f"{network.tag}-{name}"
        self.port = f"p{network.short}{index}"  # the switch's side of the host's cable
        self.address = str(SUBNET.network_address + 10 + index)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), **kwargs)

    def popen(self, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        """Start ``argv`` in this host, in a session of its own, its output appended to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            return subprocess.Popen(
                self.command(argv), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )

    def kill(self) -> None:
        """The host dies: every process in it is SIGKILLed."""
        kill_all_in(self.namespace)

    def pids(self) -> list[int]:
        return pids_in(self.namespace)


class Network:
    """The switch namespace with its bridge, and the hosts plugged into it."""

    def __init__(self) -> None:
        remove_stale()
        self.short = f"{os.getpid() % 100000}{os.urandom(1).hex()}"
        self.tag = f"{PREFIX}{os.getpid()}x{os.urandom(2).hex()}"
        self.switch = f"{self.tag}-switch"
        self.hosts: dict[str, Host] = {}
        self.down: set[str] = set()
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add(self, name: str) -> Host:
        host = Host(self, name, len(self.hosts))
        _ip("netns", "add", host.namespace)
        _ip("-n", host.namespace, "link", "set", "lo", "up")
        # Both ends made in place: nothing of the test network ever exists in the root namespace.
        peer = ("peer", "name", "eth0", "netns", host.namespace)
        _ip("-n", self.switch, "link", "add", host.port, "type", "veth", *peer)
        _ip("-n", self.switch, "link", "set", host.port, "master", "br0")
        _ip("-n", self.switch, "link", "set", host.port, "up")
        _ip("-n", host.namespace, "addr", "add", f"{host.address}/{SUBNET.prefixlen}", "dev", "eth0")
        _ip("-n", host.namespace, "link", "set", "eth0", "up")
        self.hosts[name] = host
        return host

    def partition(self, *names: str) -> None:
        """Cut ``names`` off the switch (each from every other host, both directions)."""
        for name in names:
            _ip("-n", self.switch, "link", "set", self.hosts[name].port, "down")
            self.down.add(name)

    def heal(self, *names: str) -> None:
        """Plug ``names`` back in (all of them when none is named)."""
        for name in names or tuple(self.down):
            _ip("-n", self.switch, "link", "set", self.hosts[name].port, "up")
            self.down.discard(name)

    def close(self) -> None:
        """End every process of every host, then delete every namespace (veths and bridge go with them)."""
        for host in self.hosts.values():
            kill_all_in(host.namespace)
        for namespace in [*(h.namespace for h in self.hosts.values()), self.switch]:
            kill_all_in(namespace)
            _ip("netns", "delete", namespace, check=False)
        self.hosts.clear()
