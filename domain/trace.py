"""W3C Trace Context (``traceparent``) for jobs: read at submit, made when absent, carried to the end.

``00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>``. A job keeps the
trace id it came with; maskq adds no spans of its own unless OpenTelemetry is
installed (``runtime/telemetry.py``), so the parent id passed on is the caller's.
"""

from __future__ import annotations

import re
import secrets

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def parse(header: str | None) -> str | None:
    """The header if it is a valid ``traceparent`` (lower-cased, trimmed), else None (a bad one is ignored,
    as the specification asks: a new trace starts)."""
    if not header:
        return None
    value = header.strip().lower()
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, parent_id, _ = match.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return value


def new() -> str:
    """A new trace: random trace and parent ids, sampled."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def trace_id(traceparent: str) -> str:
    return traceparent.split("-")[1]
