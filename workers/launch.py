"""Start the inference worker: one ``celery worker`` per GPU that ``MASKQ_GPUS`` names, else one.

``python -m workers.launch [celery worker options]`` is the Procfile's (and
compose's, and the Kubernetes manifests') worker command. Without
``MASKQ_GPUS`` it becomes ``celery -A workers.celery_app worker …`` (exec:
the same process, the same signals). With ``MASKQ_GPUS=all`` or ``0,1`` it
starts one worker per GPU, each pinned with ``CUDA_VISIBLE_DEVICES=<UUID>``
(so CUDA and NVML name the same card: :mod:`workers.devices`) and named
``gpuN@host``; it passes every stop signal on to each of them, and when one
of them ends it stops the others and ends with its status, so the process
manager above (honcho, compose, Kubernetes) sees one unit that failed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from config.settings import load_settings
from workers.devices import DeviceError, NvmlDevice, nvml_devices, select_gpus

CELERY_APP = ["-A", "workers.celery_app", "worker"]


def worker_commands(
    gpus: list[NvmlDevice], args: list[str], env: dict[str, str], celery: str, metrics_port: int = 0
) -> list[tuple[list[str], dict[str, str]]]:
    """The command line and environment of each GPU's worker (pure; unit-tested).

    Each serves its own series (workers/metrics.py) on the next port from ``metrics_port`` (0: none).
    """
    commands = []
    for i, gpu in enumerate(gpus):
        argv = [celery, *CELERY_APP, *_named(args, f"gpu{gpu.index}")]
        pinned = {
            **env,
            "CUDA_VISIBLE_DEVICES": gpu.uuid,
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "MASKQ_GPU_DEVICE_INDEX": "0",
            "MASKQ_GPUS": "",
            "MASKQ_WORKER_METRICS_PORT": str(metrics_port + i if metrics_port else 0),
        }
        commands.append((argv, pinned))
    return commands


def _named(args: list[str], prefix: str) -> list[str]:
    """``args`` with the worker's node name made unique per GPU (``-n x@h`` becomes ``-n gpu0-x@h``)."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg in ("-n", "--hostname") and i + 1 < len(out):
            out[i + 1] = f"{prefix}-{out[i + 1]}"
            return out
        if arg.startswith("--hostname="):
            out[i] = f"--hostname={prefix}-{arg.split('=', 1)[1]}"
            return out
    return [*out, "-n", f"{prefix}@%h"]


def _die_with_parent() -> None:
    """In each GPU's worker before exec: stopped if the launcher is killed outright (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def supervise(commands: list[tuple[list[str], dict[str, str]]]) -> int:
    """Run every worker; pass stop signals on; when one ends, stop the rest. Returns the exit status."""
    children = [
        subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with_parent) for argv, env in commands
    ]
    names = {child.pid: env["CUDA_VISIBLE_DEVICES"] for child, (_, env) in zip(children, commands)}
    stopping = False

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(signum, forward)
    status = 0
    while children:
        pid, wait_status = os.wait()
        ended = next((c for c in children if c.pid == pid), None)
        if ended is None:
            continue
        children.remove(ended)
        code = os.waitstatus_to_exitcode(wait_status)
        ended.returncode = code
        status = status or code
        if not stopping:  # one worker ended on its own: the unit has failed; stop the others
            print(f"maskq: the worker on {names[pid]} ended with status {code}; stopping the others", file=sys.stderr)
            forward(signal.SIGTERM, None)
            status = status or 1
    return status


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    settings = load_settings()
    celery = str(Path(sys.executable).with_name("celery"))
    try:
        gpus = select_gpus(settings.gpus, nvml_devices()) if settings.device != "cpu" else []
    except DeviceError as exc:
        print(f"maskq: {exc}", file=sys.stderr)
        return 2
    if not gpus:
        os.execv(celery, [celery, *CELERY_APP, *args])
    for gpu in gpus:
        print(f"maskq: worker gpu{gpu.index} on {gpu.name} {gpu.uuid}", file=sys.stderr)
    return supervise(worker_commands(gpus, args, dict(os.environ), celery, settings.worker_metrics_port))


if __name__ == "__main__":
    sys.exit(main())
