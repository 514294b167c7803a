"""The Grafana dashboard and the Prometheus configuration ask for series maskq exports, where it exports them."""

from __future__ import annotations

import json
import re

import yaml

from config.settings import Settings
from tests.conftest import ROOT

MONITORING = ROOT / "deploy" / "monitoring"
EXPORTERS = [ROOT / "stores" / "job_metrics.py", ROOT / "webapp" / "metrics.py", ROOT / "workers" / "metrics.py"]
SUFFIXES = ("_bucket", "_sum", "_count", "_total")


def base_name(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def exported() -> set[str]:
    """Every series name the code defines (counters without _total, as prometheus_client names them)."""
    names = set()
    for path in EXPORTERS:
        names |= {base_name(n) for n in re.findall(r'"(maskq_[a-z_]+)"', path.read_text())}
    return names


def dashboard() -> dict:
    return json.loads((MONITORING / "grafana" / "dashboards" / "maskq.json").read_text())


def test_every_panel_queries_series_that_maskq_exports():
    known = exported()
    assert {
        "maskq_jobs_ended",
        "maskq_job_queue_wait_seconds",
        "maskq_worker_inference_seconds",
        "maskq_gpu_utilization_ratio",
        "maskq_http_requests",
    } <= known  # the search itself works
    panels = dashboard()["panels"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = {base_name(n) for n in re.findall(r"\b(maskq_[a-z_]+)", target["expr"])}
            assert used and used <= known, (panel["title"], used - known)


def test_panel_ids_are_unique_and_the_layout_does_not_overlap():
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, p["title"]
        cells |= area


def test_prometheus_scrapes_the_web_and_the_worker_where_compose_runs_them():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert targets["maskq-web"] == [f"web:{Settings().port}"]
    assert targets["maskq-worker"] == [f"worker:{Settings().worker_metrics_port}"]
    assert compose["x-maskq"]["environment"]["MASKQ_WORKER_METRICS_HOST"] == "0.0.0.0"
    for service in ("prometheus", "grafana"):
        assert compose["services"][service]["profiles"] == ["monitoring"]
        assert all(port.startswith("127.0.0.1:") for port in compose["services"][service]["ports"])
    mounted = compose["services"]["grafana"]["volumes"]
    assert any(v.startswith("./deploy/monitoring/grafana/dashboards:") for v in mounted)
