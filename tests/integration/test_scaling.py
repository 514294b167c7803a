"""More than one host: a worker whose store is not the web's (a local folder on another host) is refused
loudly by readiness, as the README's "Scaling out" says."""

from __future__ import annotations

from storage.local import LocalStorage


def test_a_worker_on_another_local_folder_makes_the_web_not_ready(isolated, tmp_path):
    client = isolated.client()
    isolated.worker(name="elsewhere", MASKQ_STORAGE_DIR=str(tmp_path / "another-host"))
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["checks"]["storage"] == "not shared"


def test_workers_on_the_same_folder_are_ready(isolated):
    client = isolated.client()
    isolated.worker()
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    assert ready.get_json()["checks"]["storage"] == "ok"


def test_a_folder_keeps_one_identity_and_another_folder_has_its_own(tmp_path):
    one, again, other = LocalStorage(tmp_path / "a"), LocalStorage(tmp_path / "a"), LocalStorage(tmp_path / "b")
    assert one.identity() == again.identity() != other.identity()
    assert one.identity().startswith("local:")
    assert one.list("") == []  # the identity file is not an object
