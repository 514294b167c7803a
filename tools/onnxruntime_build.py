"""Which ONNX Runtime build to install: ``onnxruntime`` (CPU) or ``onnxruntime-gpu`` (CUDA, TensorRT).

The two builds install the same ``onnxruntime`` module and clash: a venv must
hold exactly one. ``MASKQ_DEVICE`` decides: ``cpu``, ``cuda``, or ``auto``
(the default: the GPU build where an NVIDIA driver is present). ``make
install`` runs ``python -m tools.onnxruntime_build install VERSION``, which removes the
other build when it is there and installs the chosen one (nothing when it is
already in place).

Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import ctypes.util
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

DEVICES = ("auto", "cuda", "cpu")
CPU_BUILD = "onnxruntime"
GPU_BUILD = "onnxruntime-gpu"


def nvidia_driver_present() -> bool:
    """Whether this host has an NVIDIA driver: its kernel module, ``nvidia-smi``, or the NVML library."""
    return (
        Path("/proc/driver/nvidia/version").exists()
        or shutil.which("nvidia-smi") is not None
        or ctypes.util.find_library("nvidia-ml") is not None
    )


def choose_build(device: str, driver_present: bool) -> str:
    """The ONNX Runtime distribution for ``MASKQ_DEVICE=device`` on a host with or without a driver."""
    device = (device or "auto").strip().lower()
    if device not in DEVICES:
        raise ValueError(f"MASKQ_DEVICE must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "auto":
        return GPU_BUILD if driver_present else CPU_BUILD
    return GPU_BUILD if device == "cuda" else CPU_BUILD


def requirement(build: str, version: str) -> str:
    """What pip installs for ``build``: the GPU build with the CUDA and cuDNN libraries it loads (PyPI's
    nvidia-* wheels, so the host needs only the driver; onnxruntime.preload_dlls() finds them)."""
    return f"{build}[cuda,cudnn]=={version}" if build == GPU_BUILD else f"{build}=={version}"


def installed_builds() -> list[str]:
    """The ONNX Runtime distributions installed in this environment (more than one is a broken venv)."""
    found = []
    for name in (CPU_BUILD, GPU_BUILD):
        try:
            importlib.metadata.version(name)
            found.append(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def install(version: str, device: str, driver_present: bool) -> str:
    """Make the chosen build, at ``version``, the only one installed; returns what was done."""
    build = choose_build(device, driver_present)
    present = installed_builds()
    if present == [build] and importlib.metadata.version(build) == version:
        return f"{build}=={version} already installed"
    pip = [sys.executable, "-m", "pip"]
    # Both builds own site-packages/onnxruntime: remove every one present, then install the chosen one.
    if present:
        subprocess.run([*pip, "uninstall", "--yes", "--quiet", *present], check=True)
    subprocess.run([*pip, "install", "--quiet", requirement(build, version)], check=True)
    return f"installed {build}=={version}" + (f" (replacing {', '.join(present)})" if present else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.onnxruntime_build", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("choose", help="print the build MASKQ_DEVICE chooses on this host")
    installing = sub.add_parser("install", help="install the chosen build at VERSION, removing the other")
    installing.add_argument("version")
    args = parser.parse_args(argv)
    device = os.environ.get("MASKQ_DEVICE", "auto")
    driver = nvidia_driver_present()
    try:
        build = choose_build(device, driver)
    except ValueError as exc:
        print(f"tools.onnxruntime_build: {exc}", file=sys.stderr)
        return 2
    reason = f"MASKQ_DEVICE={device}" + (
        f", NVIDIA driver {'found' if driver else 'not found'}" if device == "auto" else ""
    )
    if args.command == "choose":
        print(build)
        return 0
    print(f"onnxruntime: {install(args.version, device, driver)} ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
