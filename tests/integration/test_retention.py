"""Retention: jobs past it lose their records, objects and delivery logs; young ones and live writes stay."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest

from domain.keys import CREATED, job_prefix
from domain.records import JobRecord
from storage.local import TEMP_SUFFIX, LocalStorage
from stores.delivery_log import DeliveryLog, job_deliveries_key
from stores.jobs import JobStore
from tests.conftest import ROOT, VENV_BIN
from workers.retention import sweep

DAY = 24 * 3600


def make_job(
    redis_client,
    storage: LocalStorage,
    created_at: float,
    *,
    record: bool = True,
    index: bool = True,
    tenant: str = "default",
) -> str:
    job_id = uuid.uuid4().hex
    prefix = job_prefix(tenant, job_id)
    storage.put(prefix + "input.jpg", b"jpeg")
    storage.put(prefix + "result.json", b"{}")
    if record:
        store = JobStore(redis_client, 30 * DAY)
        job = JobRecord(
            id=job_id,
            tenant=tenant,
            lane="default",
            model="text-regions",
            input_key=prefix + "input.jpg",
            image_sha256="",
            width=1,
            height=1,
            created_at=created_at,
            request={"webhook": {"url": "https://hooks.example/x"}},
        )
        store.create(job)
        DeliveryLog(redis_client).create(job, "job.succeeded", "https://hooks.example/x", "{}", 30 * DAY)
    if not index:
        redis_client.zrem(CREATED, f"{tenant}/{job_id}")
    elif not record:
        redis_client.zadd(CREATED, {f"{tenant}/{job_id}": created_at})
    return job_id


def gone(redis_client, storage, job_id, tenant="default") -> bool:
    return (
        storage.list(job_prefix(tenant, job_id)) == []
        and not redis_client.exists(JobStore.key(job_id))
        and not redis_client.exists(job_deliveries_key(job_id))
        and redis_client.zscore(CREATED, f"{tenant}/{job_id}") is None
    )


def test_a_sweep_deletes_old_jobs_whole_and_keeps_young_ones(redis_client, settings, tmp_path):
    storage = LocalStorage(tmp_path / "store")
    now = time.time()
    old = make_job(redis_client, storage, now - 8 * DAY)
    old_other_tenant = make_job(redis_client, storage, now - 8 * DAY, tenant="acme")
    old_record_expired = make_job(redis_client, storage, now - 9 * DAY, record=False)
    young = make_job(redis_client, storage, now - 6 * DAY)
    done = sweep(redis_client, storage, settings, now=now)
    assert done.jobs_deleted == 3 and done.objects_deleted == 6
    assert gone(redis_client, storage, old) and gone(redis_client, storage, old_record_expired)
    assert gone(redis_client, storage, old_other_tenant, "acme")
    assert storage.list(job_prefix("default", young)) and redis_client.exists(JobStore.key(young))
    assert DeliveryLog(redis_client).for_job(young)


def test_a_folder_the_index_lacks_is_adopted_and_goes_one_retention_later(redis_client, settings, tmp_path):
    storage = LocalStorage(tmp_path / "store")
    now = time.time()
    stray = make_job(redis_client, storage, now - 30 * DAY, record=False, index=False)
    assert sweep(redis_client, storage, settings, now=now).jobs_adopted == 1
    assert storage.list(job_prefix("default", stray))  # no age known: kept for now
    assert redis_client.zscore(CREATED, f"default/{stray}") == pytest.approx(now)
    sweep(redis_client, storage, settings, now=now + settings.retention_s + 1)
    assert gone(redis_client, storage, stray)


class CountingStorage(LocalStorage):
    """The local store, counting its listings of ``tenants/`` (the walk of every stored object)."""

    listings = 0

    def list(self, prefix: str) -> list[str]:
        if prefix == "tenants/":
            self.listings += 1
        return super().list(prefix)


def test_a_sweep_walks_storage_once_for_job_and_image_folders(redis_client, settings, tmp_path):
    storage = CountingStorage(tmp_path / "store")
    stray = make_job(redis_client, storage, time.time(), record=False, index=False)
    storage.put(f"tenants/default/images/{'b' * 64}/image.png", b"png")
    done = sweep(redis_client, storage, settings)
    assert storage.listings == 1
    assert done.jobs_adopted == 1 and redis_client.zscore(CREATED, f"default/{stray}") is not None


def test_stale_temporary_files_of_the_local_store_go_and_fresh_ones_stay(redis_client, settings, tmp_path):
    storage = LocalStorage(tmp_path / "store")
    folder = storage.root / "tenants" / "default" / "jobs" / ("a" * 32)
    folder.mkdir(parents=True)
    stale, fresh = folder / f"tmp1{TEMP_SUFFIX}", folder / f"tmp2{TEMP_SUFFIX}"
    for path in (stale, fresh):
        path.write_bytes(b"half a write")
    old = time.time() - settings.retention_partial_age_s - 60
    os.utime(stale, (old, old))
    assert sweep(redis_client, storage, settings).partial_files_deleted == 1
    assert not stale.exists() and fresh.exists()


def test_celery_beat_runs_retention_on_schedule_through_a_worker(worker, base_env, redis_client, settings, tmp_path):
    storage = LocalStorage(settings.storage_root)  # the store the shared worker uses
    now = time.time()
    old = make_job(redis_client, storage, now - 8 * DAY)
    young = make_job(redis_client, storage, now)
    env = {**os.environ, **base_env, "MASKQ_RETENTION_INTERVAL_S": "0.5"}
    with (tmp_path / "beat.log").open("wb") as log:
        beat = subprocess.Popen(
            [
                str(VENV_BIN / "celery"),
                "-A",
                "workers.celery_app",
                "beat",
                "-s",
                str(tmp_path / "schedule"),
                "--loglevel",
                "INFO",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while not gone(redis_client, storage, old):
                assert beat.poll() is None, (tmp_path / "beat.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "retention did not run within 30 s"
                time.sleep(0.1)
        finally:
            beat.terminate()
            beat.wait(10)
    assert storage.list(job_prefix("default", young)) and redis_client.exists(JobStore.key(young))
    assert "Sending due task retention (maskq.apply_retention)" in (tmp_path / "beat.log").read_text()
