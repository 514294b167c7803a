"""Which device a worker runs its models on, named so that NVML and CUDA agree.

NVML numbers every GPU of the host in PCI bus order and ignores
``CUDA_VISIBLE_DEVICES``; CUDA numbers only the devices that variable lets
through, in its own order. So "GPU 0" can be two different cards, and a gate
reading NVML's could watch one GPU while the model fills another. Here a
device is known by its UUID: the CUDA ordinal a worker was given
(``MASKQ_GPU_DEVICE_INDEX``, among the visible devices) is mapped to an NVML
device through ``CUDA_VISIBLE_DEVICES``, and the launcher
(:mod:`workers.launch`) pins each worker with ``CUDA_VISIBLE_DEVICES=<UUID>``
and ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so both sides see one card, the same one.

Everything but :func:`nvml_devices` and :func:`placement_here` is pure logic,
unit-tested with made-up device lists.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass

from models.adapters.base import RuntimeOptions

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


class DeviceError(ValueError):
    """A GPU setting that names no device of this host (the message says which and what there is)."""


@dataclass(frozen=True)
class NvmlDevice:
    """One GPU as NVML lists it."""

    index: int  # NVML's (PCI bus order), not CUDA's
    uuid: str  # "GPU-8f6c…"
    name: str = "NVIDIA GPU"
    memory_mb: float = 0.0

    @property
    def cache_key(self) -> str:
        """The GPU's model as a folder name ("NVIDIA-H200"): TensorRT engines are built per GPU model."""
        return re.sub(r"[^A-Za-z0-9.]+", "-", self.name).strip("-") or "gpu"


def visible_devices(cuda_visible: str | None, nvml: list[NvmlDevice], pci_order: bool = True) -> list[NvmlDevice]:
    """The devices CUDA numbers 0, 1, …, under ``CUDA_VISIBLE_DEVICES=cuda_visible``, as NVML knows them.

    As CUDA reads the variable: unset means every device; entries are NVML
    indices or UUIDs (a unique prefix of one, ``GPU-`` included); the list
    ends at the first entry that names no device, or one named twice. With
    integer entries and without ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (``pci_order``
    false), CUDA numbers devices fastest first, which NVML cannot tell:
    such a setting on a host with more than one GPU is refused.
    """
    by_index = sorted(nvml, key=lambda d: d.index)
    if cuda_visible is None:
        if not pci_order and len(by_index) > 1:
            raise DeviceError(
                "several GPUs and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA's numbering "
                "is not NVML's; set CUDA_DEVICE_ORDER=PCI_BUS_ID"
            )
        return by_index
    chosen: list[NvmlDevice] = []
    for entry in (e.strip() for e in cuda_visible.split(",")):
        device = _named(entry, by_index)
        if device is None or device in chosen:
            break
        if entry.isdigit() and not pci_order and len(by_index) > 1:
            raise DeviceError(
                f"CUDA_VISIBLE_DEVICES={cuda_visible} counts GPUs by index, and without "
                "CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA's index is not NVML's: name them by UUID"
            )
        chosen.append(device)
    return chosen


def _named(entry: str, devices: list[NvmlDevice]) -> NvmlDevice | None:
    if entry.isdigit():
        return next((d for d in devices if d.index == int(entry)), None)
    if entry.upper().startswith("GPU-"):
        matches = [d for d in devices if d.uuid.lower().startswith(entry.lower())]
        return matches[0] if len(matches) == 1 else None
    return None  # MIG instances and anything else: not a whole GPU this code can map


def select_gpus(setting: str, nvml: list[NvmlDevice]) -> list[NvmlDevice]:
    """The GPUs ``MASKQ_GPUS`` asks for: "" (none), "all", or NVML indices / UUIDs, comma-separated."""
    setting = setting.strip()
    if not setting or setting.lower() == "none":
        return []
    by_index = sorted(nvml, key=lambda d: d.index)
    if setting.lower() == "all":
        if not by_index:
            raise DeviceError("MASKQ_GPUS=all, and NVML finds no GPU on this host")
        return by_index
    chosen = []
    for entry in (e.strip() for e in setting.split(",") if e.strip()):
        device = _named(entry, by_index)
        if device is None:
            there = ", ".join(f"{d.index} ({d.uuid})" for d in by_index) or "none"
            raise DeviceError(f"MASKQ_GPUS names {entry!r}, which is no GPU of this host (NVML lists: {there})")
        if device in chosen:
            raise DeviceError(f"MASKQ_GPUS names GPU {device.index} twice")
        chosen.append(device)
    return chosen


@dataclass(frozen=True)
class Placement:
    """Where one worker runs its models, and with which ONNX Runtime providers."""

    gpu: NvmlDevice | None  # what the resource gate reads through NVML; None: host memory
    cuda_device_id: int  # the providers' device_id: the ordinal among the visible devices
    providers: tuple[str, ...]
    providers_required: bool  # MASKQ_DEVICE=cuda: a model that cannot get them does not load
    reason: str

    def describe(self) -> dict:
        """For the heartbeat and ``GET /v1/models``."""
        device = (
            f"cuda:{self.cuda_device_id} {self.gpu.name} {self.gpu.uuid}"
            if self.gpu and CUDA in self.providers
            else "cpu"
        )
        return {"device": device, "providers": list(self.providers), "reason": self.reason}


def place(
    device: str,
    gpu_index: int,
    configured: tuple[str, ...],
    cuda_visible: str | None,
    nvml: list[NvmlDevice],
    ort_providers: list[str],
    pci_order: bool = True,
) -> Placement:
    """Decide where this worker runs (pure: every input is given).

    ``device`` is ``MASKQ_DEVICE`` (auto, cuda, cpu); ``gpu_index`` the CUDA
    ordinal among the visible devices; ``configured`` is ``MASKQ_ORT_PROVIDERS``
    (empty: by device); ``ort_providers`` what the installed onnxruntime build
    offers.
    """
    if device == "cpu":
        return Placement(None, 0, (CPU,), False, "MASKQ_DEVICE=cpu")
    visible = visible_devices(cuda_visible, nvml, pci_order)
    gpu = visible[gpu_index] if 0 <= gpu_index < len(visible) else None
    has_cuda = CUDA in ort_providers
    if device == "cuda":
        providers = tuple(configured) or (CUDA,)
        if gpu is None:
            reason = (
                f"MASKQ_DEVICE=cuda but no GPU {gpu_index} is visible "
                f"({len(visible)} visible of the {len(nvml)} NVML lists): models needing {providers[0]} will not load"
            )
        elif not has_cuda:
            reason = "MASKQ_DEVICE=cuda but this onnxruntime build has no CUDA provider: install onnxruntime-gpu"
        else:
            reason = f"MASKQ_DEVICE=cuda: {gpu.name} {gpu.uuid}"
        return Placement(gpu, gpu_index, providers, True, reason)
    if device != "auto":
        raise DeviceError(f"MASKQ_DEVICE must be auto, cuda or cpu, not {device!r}")
    if gpu is not None and has_cuda:
        providers = tuple(configured) or (CUDA, CPU)
        return Placement(gpu, gpu_index, providers, False, f"MASKQ_DEVICE=auto: {gpu.name} {gpu.uuid}")
    reason = "MASKQ_DEVICE=auto: " + (
        "no GPU visible" if gpu is None else "this onnxruntime build has no CUDA provider"
    )
    providers = tuple(p for p in configured if p not in (CUDA, TENSORRT)) or (CPU,)
    return Placement(None, 0, providers, False, reason)


def nvml_devices() -> list[NvmlDevice]:
    """Every GPU NVML lists on this host; none where there is no driver or no NVML library."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no library: no GPU here
        log.debug("NVML not available: %s", exc)
        return []
    devices = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20
        devices.append(
            NvmlDevice(
                index,
                uuid if isinstance(uuid, str) else uuid.decode(),
                name if isinstance(name, str) else name.decode(),
                memory,
            )
        )
    return devices


def placement_here(settings) -> Placement:
    """:func:`place` with this host's NVML devices, environment and onnxruntime build."""
    import onnxruntime

    # CUDA reads this when it starts (at a process's first CUDA session): PCI bus order is NVML's order.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    placement = place(
        settings.device,
        settings.gpu_device_index,
        tuple(settings.ort_providers),
        os.environ.get("CUDA_VISIBLE_DEVICES"),
        nvml_devices() if settings.device != "cpu" else [],
        onnxruntime.get_available_providers(),
        pci_order=os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID",
    )
    log.log(
        logging.WARNING if placement.providers_required and "no GPU" in placement.reason else logging.INFO,
        "device: %s (%s; onnxruntime %s offers %s)",
        placement.describe()["device"],
        placement.reason,
        onnxruntime.__version__,
        onnxruntime.get_available_providers(),
    )
    return placement


def runtime_options(settings, placement: Placement) -> RuntimeOptions:
    """The deployment's ONNX Runtime options on ``placement``'s device, TensorRT engines cached per GPU model."""
    import onnxruntime

    trt_cache = None
    if placement.gpu is not None:
        trt_cache = str(settings.trt_cache_path / placement.gpu.cache_key / f"onnxruntime-{onnxruntime.__version__}")
    return dataclasses.replace(
        RuntimeOptions.from_settings(settings),
        providers=placement.providers,
        providers_required=placement.providers_required,
        device_id=placement.cuda_device_id,
        trt_cache_dir=trt_cache,
    )
