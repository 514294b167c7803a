"""The benchmarks' service stack starts from the Procfile's own command lines (a Procfile edit that the
benchmarks cannot run must fail here, not weeks later in `make bench`)."""

from __future__ import annotations

import requests

from bench.common import ServiceStack


def test_the_benchmark_stack_runs_the_procfile_commands_and_serves():
    with ServiceStack(overrides={"result_cache_enabled": False}, workers=[["-n", "bench-a@%h"]]) as stack:
        assert requests.get(f"{stack.base_url}/readyz", timeout=5).status_code == 200
        assert stack.headers["Authorization"].startswith("Bearer ")
