"""``make run``: the Procfile under honcho, given the time to stop in order (``python -m cli.procfile``).

On Ctrl-C honcho sends SIGTERM to every process at once and SIGKILL to
whatever is left 5 s after the first one ends (``honcho.manager.KILL_WAIT``;
honcho has no option for it: nickstenning/honcho#189). A worker's warm
shutdown lasts as long as its running job, and the embedded Redis waits for
the workers before it stops (``maskq redis``, at most
``MASKQ_EMBEDDED_REDIS_STOP_WAIT_S``); honcho's 5 s cut both short, so a job
that ran longer than that was left ``running`` for recovery at the next start.
Here honcho waits that long and a margin more, so the order holds.
"""

from __future__ import annotations

import sys

import honcho.command
import honcho.manager

from config.settings import load_settings

# After the Redis wait ends: Redis writing its AOF and exiting, the workers' and web's last steps.
STOP_MARGIN_S = 10.0


def kill_wait_s(embedded_redis_stop_wait_s: float) -> float:
    """Seconds honcho lets the processes stop before it kills them (pure; unit-tested)."""
    return embedded_redis_stop_wait_s + STOP_MARGIN_S


def main(argv: list[str] | None = None) -> int:
    """``honcho start -f Procfile [argv…]`` with the longer stop grace."""
    try:
        settings = load_settings()
    except ValueError as exc:  # pydantic's ValidationError says which MASKQ_ variable is wrong
        print(f"maskq: bad settings: {exc}", file=sys.stderr)
        return 2
    # honcho reads its module's KILL_WAIT while it stops the processes: this is the one place to set it.
    honcho.manager.KILL_WAIT = kill_wait_s(settings.embedded_redis_stop_wait_s)
    honcho.command.main(["start", "-f", "Procfile", *(sys.argv[1:] if argv is None else argv)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
