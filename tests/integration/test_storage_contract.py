"""One contract for every storage backend: the local folder and S3 (a real S3-compatible server process)."""

from __future__ import annotations

import os
import uuid

import pytest
import requests

from domain.errors import StorageUnavailable
from domain.keys import job_prefix
from storage import open_storage
from storage.local import LocalStorage
from storage.s3 import S3Storage, StorageMisconfigured
from tests.conftest import VENV_BIN, free_port, require, settings_from
from tests.integration.s3_server import ACCESS_KEY, SECRET_KEY, S3Server

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    require((VENV_BIN / "moto_server").exists(), "moto[server] (requirements-dev.txt) for a real S3-compatible server")
    server = S3Server(free_port(), tmp_path_factory.mktemp("s3") / "journal.jsonl").start()
    yield server
    server.kill()


def s3_storage(server: S3Server, bucket: str, **options) -> S3Storage:
    return S3Storage(
        bucket,
        endpoint_url=server.url,
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        path_style=True,
        timeout_s=2,
        **options,
    )


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    bucket = server.create_bucket(f"contract-{uuid.uuid4().hex[:12]}")
    return s3_storage(server, bucket, multipart_threshold_bytes=5 * MiB)


@pytest.fixture(params=["local", "s3"])
def unreachable(request, tmp_path):
    """A backend whose store is gone: a folder replaced by a file; an endpoint where nothing listens."""
    if request.param == "local":
        store = LocalStorage(tmp_path / "store")
        store.root.rmdir()
        store.root.write_bytes(b"not a folder")
        return store
    return S3Storage(
        "anything",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        path_style=True,
        timeout_s=1,
    )


PREFIX = job_prefix("acme", "0123456789abcdef0123456789abcdef")


def test_bytes_put_come_back_unchanged_and_a_second_put_replaces_them(storage):
    data = bytes(range(256)) * 100
    storage.put(PREFIX + "input.jpg", data, "image/jpeg")
    assert storage.get(PREFIX + "input.jpg") == data
    storage.put(PREFIX + "input.jpg", b"second", "image/jpeg")
    assert storage.get(PREFIX + "input.jpg") == b"second"


def test_a_missing_key_is_a_key_error_and_does_not_exist(storage):
    with pytest.raises(KeyError):
        storage.get(PREFIX + "nothing.json")
    assert not storage.exists(PREFIX + "nothing.json")
    storage.put(PREFIX + "result.json", b"{}", "application/json")
    assert storage.exists(PREFIX + "result.json")


def test_list_returns_every_key_under_a_prefix_sorted_and_nothing_beside_it(storage):
    other = job_prefix("acme", "f" * 32)
    keys = [PREFIX + "result.json", PREFIX + "masks/1.png", PREFIX + "input.png", PREFIX + "masks/0.png"]
    for key in [*keys, other + "input.png", job_prefix("other", "0" * 32) + "input.png"]:
        storage.put(key, b"x")
    assert storage.list(PREFIX) == sorted(keys)
    assert storage.list(PREFIX + "masks/") == [PREFIX + "masks/0.png", PREFIX + "masks/1.png"]
    assert storage.list(job_prefix("nobody", "0" * 32)) == []


def test_delete_removes_one_key_and_a_missing_key_is_no_error(storage):
    storage.put(PREFIX + "a", b"1")
    storage.put(PREFIX + "b", b"2")
    storage.delete(PREFIX + "a")
    storage.delete(PREFIX + "never-there")
    assert storage.list(PREFIX) == [PREFIX + "b"]


def test_delete_prefix_removes_a_jobs_objects_counts_them_and_spares_the_rest(storage):
    other = job_prefix("acme", "f" * 32)
    for name in ("input.png", "result.json", "masks/0.png"):
        storage.put(PREFIX + name, b"x")
    storage.put(other + "input.png", b"y")
    assert storage.delete_prefix(PREFIX) == 3
    assert storage.list(PREFIX) == []
    assert storage.get(other + "input.png") == b"y"
    assert storage.delete_prefix(PREFIX) == 0


def test_a_large_object_round_trips(storage):
    data = os.urandom(12 * MiB)
    storage.put(PREFIX + "input.tiff", data, "image/tiff")
    assert storage.get(PREFIX + "input.tiff") == data


def test_a_url_is_none_or_fetches_the_object_over_plain_http(storage):
    storage.put(PREFIX + "masks/0.png", b"\x89PNG mask", "image/png")
    url = storage.url(PREFIX + "masks/0.png")
    if isinstance(storage, LocalStorage):
        assert url is None  # the API serves local files itself
        return
    answer = requests.get(url, timeout=5)
    assert answer.status_code == 200 and answer.content == b"\x89PNG mask"
    assert answer.headers["Content-Type"] == "image/png"


def test_check_passes_on_a_usable_store(storage):
    storage.check()


def test_a_store_that_is_gone_is_storage_unavailable_for_every_call(unreachable):
    for call in (lambda: unreachable.put(PREFIX + "x", b"1"), lambda: unreachable.get(PREFIX + "x"), unreachable.check):
        with pytest.raises(StorageUnavailable):
            call()
    if isinstance(unreachable, S3Storage):
        with pytest.raises(StorageUnavailable):
            unreachable.list(PREFIX)


# What only S3 has: parts, presigned expiry, the start-up check.


def test_on_s3_a_large_object_goes_up_in_parts(s3_server):
    bucket = s3_server.create_bucket(f"parts-{uuid.uuid4().hex[:12]}")
    s3_storage(s3_server, bucket, multipart_threshold_bytes=5 * MiB).put("big", os.urandom(12 * MiB))
    etag = s3_server.client().head_object(Bucket=bucket, Key="big")["ETag"]
    assert etag.strip('"').endswith("-3")  # 5 + 5 + 2 MiB: a multipart upload's ETag counts its parts


def test_a_presigned_url_expires_after_the_configured_time(s3_server):
    bucket = s3_server.create_bucket(f"presign-{uuid.uuid4().hex[:12]}")
    assert "X-Amz-Expires=120" in s3_storage(s3_server, bucket, presign_expiry_s=120).url("k")


def test_open_storage_picks_s3_when_a_bucket_is_set_and_says_when_it_does_not_exist(s3_server, base_env):
    bucket = s3_server.create_bucket(f"open-{uuid.uuid4().hex[:12]}")
    assert isinstance(open_storage(settings_from({**base_env, **s3_server.env_for(bucket)})), S3Storage)
    assert isinstance(open_storage(settings_from(base_env)), LocalStorage)
    with pytest.raises(StorageMisconfigured, match=r"bucket 'no-such-bucket' does not exist"):
        open_storage(settings_from({**base_env, **s3_server.env_for("no-such-bucket")}))


def test_the_start_up_check_says_when_the_credentials_are_refused(tmp_path):
    require((VENV_BIN / "moto_server").exists(), "moto[server] (requirements-dev.txt) for a real S3-compatible server")
    # This server checks access keys (moto's IAM emulation), and knows none.
    server = S3Server(free_port(), tmp_path / "journal.jsonl", env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}).start()
    try:
        with pytest.raises(StorageMisconfigured, match=r"refused the credentials.*InvalidAccessKeyId"):
            s3_storage(server, "some-bucket").startup_check()
    finally:
        server.kill()


def test_the_start_up_check_lets_a_store_that_is_down_start_and_reports_it_on_check():
    gone = S3Storage(
        "b",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        timeout_s=1,
    )
    gone.startup_check()  # the store may come up after maskq does
    with pytest.raises(StorageUnavailable, match="cannot reach bucket b"):
        gone.check()
