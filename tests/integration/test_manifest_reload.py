"""A new model version through the manifest while a real worker runs: no restart, each job on one version."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import image_bytes
from tests.integration.helpers import small_png, submit, wait_for

# The real text-regions model, stamping each result with the version of the adapter that computed it.
STAMP = "tests.support.version_stamp:VersionStampAdapter"


def write_manifest(path: Path, version: str, hold: Path | None = None) -> None:
    options = f'options = {{ hold_until = "{hold}" }}\n' if hold else ""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        f'default = "text-regions"\n[models.text-regions]\nversion = "{version}"\nadapter = "{STAMP}"\n' + options
    )
    os.replace(tmp, path)  # atomic, as a deploy tool should write it


def served_by(job: dict) -> list[str]:
    return [i["label"] for i in job["result"]["instances"] if i["label"].startswith("served-by ")]


def text_regions(client) -> dict:
    return next(m for m in client.get("/v1/models").get_json()["models"] if m["name"] == "text-regions")


def test_a_new_version_in_the_manifest_takes_over_without_a_restart_and_a_running_job_finishes_on_its_own(
    isolated, tmp_path
):
    manifest, release = tmp_path / "models.toml", tmp_path / "release-v1-jobs"
    write_manifest(manifest, "v1", hold=release)  # v1 holds its jobs inside predict until released
    worker = isolated.worker(MASKQ_MODELS_MANIFEST=manifest, MASKQ_MANIFEST_CHECK_S=0.1)
    pool = set(worker.children())
    client = isolated.client(models_manifest=manifest, manifest_check_s=0.1)
    jobs = isolated.jobs()

    first = submit(client, image_bytes("en.jpg")).get_json()
    wait_for(lambda: jobs.get(first["id"]).status == "running", 20)
    queued = submit(client, small_png(1)).get_json()  # behind the first one, submitted under v1
    assert first["model"]["version"] == queued["model"]["version"] == "v1"

    write_manifest(manifest, "v2")
    # The worker sets v2 up while the first job is still inside v1's predict; the web serves v2 too.
    wait_for(lambda: text_regions(client)["loaded_versions"] == ["v2"], 20)
    assert text_regions(client)["version"] == "v2" and text_regions(client)["loaded"] is True
    assert jobs.get(first["id"]).status == "running"
    later = submit(client, small_png(2)).get_json()
    assert later["model"]["version"] == "v2"

    release.touch()
    first, queued, later = (client.get(f"/v1/jobs/{job['id']}?wait=30").get_json() for job in (first, queued, later))
    assert [job["status"] for job in (first, queued, later)] == ["succeeded"] * 3
    # The first job finished on the adapter it started with, although v2 had replaced it meanwhile.
    assert first["model"]["version"] == "v1" and served_by(first) == ["served-by v1"]
    assert len(first["result"]["instances"]) > 1  # and the real model found the text as well
    # A job takes the version loaded when it starts, and records that one.
    assert queued["model"]["version"] == "v2" and served_by(queued) == ["served-by v2"]
    assert later["model"]["version"] == "v2" and served_by(later) == ["served-by v2"]
    assert not any(job["degraded"] for job in (first, queued, later))
    # Nothing was restarted: the pool process that started with v1 ran every job.
    assert worker.alive and set(worker.children()) == pool
    assert "model text-regions version v2 loaded (replacing version v1)" in worker.log()
