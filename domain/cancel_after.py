"""The ``Cancel-After`` header of a submit: how long a job may take, from its submit, before it is canceled.

Taken as Replicate's API takes it: a duration with units ``h``, ``m``, ``s``
(``30s``, ``5m``, ``1h30m``) or plain seconds (``30``), from
:data:`MIN_S` to :data:`MAX_S`. A job that has not ended by then is moved to
``canceled`` with the error code :data:`CODE`, whether it is still queued or
already running (a running job's result is then discarded, as for
``DELETE /v1/jobs/{id}``). Worker upkeep enforces it from an index in Redis
(``keys.CANCEL_AT``), and a read enforces it too (``JobStore.cancel_due``,
``webapp/jobs.py``), so it holds across restarts.
"""

from __future__ import annotations

import re

from domain.errors import InputError, ValidationFailed

HEADER = "Cancel-After"
CODE = "cancel_after"  # the error code of a job canceled by its Cancel-After
MIN_S = 5.0  # less would cancel most jobs before a worker could even take them
MAX_S = 24 * 3600.0  # a job's own bound; records live longer (MASKQ_JOB_TTL_S), so the index stays small
MAX_LENGTH = 32  # characters: no real duration is longer

_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
# Plain seconds, or hours, minutes and seconds in that order, each optional but not all missing.
PATTERN = rf"^(?:{_NUMBER}|{_NUMBER}h(?:{_NUMBER}m)?(?:{_NUMBER}s)?|{_NUMBER}m(?:{_NUMBER}s)?|{_NUMBER}s)$"
_DURATION = re.compile(rf"(?:(?P<h>{_NUMBER})h)?(?:(?P<m>{_NUMBER})m)?(?:(?P<s>{_NUMBER})s)?", re.ASCII)
_SECONDS = re.compile(_NUMBER, re.ASCII)


def parse_cancel_after(value: str | None) -> float | None:
    """Seconds from a ``Cancel-After`` value; None without one.

    An unreadable value is a 400 and one outside ``MIN_S``..``MAX_S`` a 422, each naming the header.
    """
    if value is None:
        return None
    text = value.strip()
    if len(text) > MAX_LENGTH:
        raise _unreadable(f"is longer than {MAX_LENGTH} characters")
    if _SECONDS.fullmatch(text):
        seconds = float(text)
    elif text and (parts := _DURATION.fullmatch(text)) and any(parts.groups()):
        seconds = 3600 * float(parts["h"] or 0) + 60 * float(parts["m"] or 0) + float(parts["s"] or 0)
    else:
        raise _unreadable("is not a duration")
    if not MIN_S <= seconds <= MAX_S:
        raise ValidationFailed(
            f"{HEADER} must be from {MIN_S:g} s to {MAX_S / 3600:g} h, not {text!r}",
            errors=[{"field": HEADER, "message": f"must be {MIN_S:g}s..{MAX_S / 3600:g}h"}],
        )
    return seconds


def _unreadable(why: str) -> InputError:
    return InputError(
        f"{HEADER} {why}: send a duration such as 30s, 5m or 1h30m, or plain seconds",
        errors=[{"field": HEADER, "message": "not a duration (h, m, s units, or seconds)"}],
    )


def message(seconds: float, was_running: bool) -> str:
    """The canceled job's ``error.message``."""
    where = "while it ran (its result is discarded)" if was_running else "before it started"
    return f"the job did not end within its {HEADER} of {seconds:g} s; canceled {where}"
