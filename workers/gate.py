"""The resource gate: a worker consumes its lanes only while the device has room for a job.

Free memory comes from NVML (``nvidia-ml-py``) when an NVIDIA GPU is there,
else from the host's available memory. While it is below what one job needs
plus a reserve, the worker cancels its lane consumers; when it is back, it
consumes them again, in lane order. The reserve can be changed at run time
(``SET maskq:gate:reserve_mb 256`` in Redis) without a restart.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import asdict, dataclass

import psutil
import redis

from stores import fleet
from workers.devices import NvmlDevice, placement_here

log = logging.getLogger(__name__)

MB = 1024 * 1024


class HostMemory:
    """Available host memory: the device of a CPU-only worker."""

    name = "host"

    def free_bytes(self) -> int:
        return int(psutil.virtual_memory().available)


class GpuMemory:
    """Free memory of one NVIDIA GPU, through NVML, found by its UUID (NVML's indices are not CUDA's)."""

    def __init__(self, gpu: NvmlDevice, cuda_device_id: int = 0):
        import pynvml

        pynvml.nvmlInit()
        self._pynvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
        self.name = f"cuda:{cuda_device_id} ({gpu.uuid})"

    def free_bytes(self) -> int:
        return int(self._pynvml.nvmlDeviceGetMemoryInfo(self._handle).free)


def detect_device(settings):
    """The memory of the GPU this worker's models run on (workers/devices.py), else the host's."""
    placement = placement_here(settings)
    if placement.gpu is None:
        log.info("gating on host memory (%s)", placement.reason)
        return HostMemory()
    try:
        return GpuMemory(placement.gpu, placement.cuda_device_id)
    except Exception as exc:  # the GPU went away between listing and opening it
        log.warning("NVML cannot open %s (%s); gating on host memory", placement.gpu.uuid, exc)
        return HostMemory()


@dataclass
class GateState:
    open: bool
    device: str
    free_mb: float
    need_mb: float
    reserve_mb: float


class ResourceGate:
    """Decides, on each check, whether this worker may take another job."""

    def __init__(self, device, need_mb: float, reserve_mb: float, client: redis.Redis, worker: str | None = None):
        self.device = device
        self.need_mb = need_mb
        self.reserve_mb = reserve_mb
        self.redis = client
        self.worker = worker or socket.gethostname()
        self.state: GateState | None = None

    def reserve(self) -> float:
        try:
            override = fleet.reserve_override(self.redis)
        except redis.RedisError:
            override = None
        return override if override is not None else self.reserve_mb

    def check(self) -> tuple[GateState, bool]:
        """The gate's state now, and whether it changed since the last check."""
        free_mb = self.device.free_bytes() / MB
        reserve = self.reserve()
        state = GateState(free_mb >= self.need_mb + reserve, self.device.name, round(free_mb, 1), self.need_mb, reserve)
        changed = self.state is None or state.open != self.state.open
        if changed:
            log.log(
                logging.INFO if state.open else logging.WARNING,
                "resource gate %s on %s: free %.0f MB, one job needs %.0f MB + reserve %.0f MB",
                "open" if state.open else "CLOSED",
                state.device,
                free_mb,
                self.need_mb,
                reserve,
            )
        self.state = state
        return state, changed

    def publish(self, ttl_s: float) -> None:
        if self.state is not None:
            fleet.write_gate(self.redis, self.worker, asdict(self.state), ttl_s)
