"""Retention: deleting old jobs and stray temporary files (``tasks/retention.py`` runs it on a schedule).

Records expire by themselves (``job_ttl_s``); objects in storage do not. So
the sweep works from an index that outlives the records — the sorted set
``maskq:jobs:created`` ("tenant/job_id" by creation time, written by
``JobStore.create``) — and deletes, for every job older than
``retention_s``, its objects, its record and its webhook delivery log.

Job folders the index does not know (written before it existed, or after
Redis lost its data) are found by listing storage and adopted into the index
as of the first sweep that sees them, so they go one retention period later
rather than never. In the embedded (local folder) store, temporary files of
writes that died half-way (``*.partial``) older than ``retention_partial_age_s``
are removed too.

Images stored ahead of their jobs (``POST /v1/images``, ``stores/images.py``)
go the same way, from their own index, ``retention_s`` after their last use
(an upload, or a job naming them): their file and record.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import cast

import redis

from domain.keys import CREATED, DEADLINES, image_prefix, job_prefix, lane_index
from storage import Storage
from storage.local import TEMP_SUFFIX, LocalStorage
from stores.delivery_log import DeliveryLog
from stores.images import ImageStore
from stores.jobs import JobStore

log = logging.getLogger(__name__)

BATCH = 200
# One sweep stops after this long and leaves the rest to the next: it shares a queue with webhooks.
SWEEP_BUDGET_S = 30.0


@dataclass
class Sweep:
    """What one retention sweep did."""

    jobs_deleted: int = 0
    objects_deleted: int = 0
    jobs_adopted: int = 0
    partial_files_deleted: int = 0
    images_deleted: int = 0


def sweep(client: redis.Redis, storage: Storage, settings, now: float | None = None) -> Sweep:
    """Delete what is past retention; safe to run from several processes at once."""
    now = time.time() if now is None else now
    done = Sweep()
    folders = stored_folders(storage)  # one listing of storage for both indexes
    done.jobs_adopted = adopt_unindexed(client, folders["jobs"], now)
    cutoff = now - settings.retention_s
    deadline = time.monotonic() + SWEEP_BUDGET_S
    while time.monotonic() < deadline:
        members = cast("list[bytes]", client.zrangebyscore(CREATED, "-inf", cutoff, start=0, num=BATCH))
        if not members:
            break
        for member in members:
            tenant, _, job_id = member.decode().rpartition("/")
            done.objects_deleted += forget_job(client, storage, tenant, job_id)
            client.zrem(CREATED, member)  # last: a sweep that dies half-way finds the job again
            done.jobs_deleted += 1
    done.images_deleted = forget_images(client, storage, settings, folders["images"], cutoff, now, deadline)
    if isinstance(storage, LocalStorage):
        done.partial_files_deleted = remove_stale_partials(storage, now - settings.retention_partial_age_s)
    return done


def forget_job(client: redis.Redis, storage: Storage, tenant: str, job_id: str) -> int:
    """Delete one job's objects, record, indexes and delivery log; return how many objects went."""
    objects = storage.delete_prefix(job_prefix(tenant, job_id))
    record = JobStore(client, 0).get(job_id)
    with client.pipeline() as pipe:
        if record is not None:
            pipe.zrem(lane_index(record.lane), job_id)
        pipe.zrem(DEADLINES, job_id)
        pipe.delete(JobStore.key(job_id))
        pipe.execute()
    DeliveryLog(client).forget_job(job_id)
    return objects


def stored_folders(storage: Storage) -> dict[str, set[str]]:
    """The ``tenant/id`` folders storage holds, by kind (``jobs``, ``images``), from one listing of ``tenants/``."""
    folders: dict[str, set[str]] = {"jobs": set(), "images": set()}
    for parts in (key.split("/") for key in storage.list("tenants/")):
        if len(parts) > 4 and parts[0] == "tenants" and parts[2] in folders:
            folders[parts[2]].add(f"{parts[1]}/{parts[3]}")
    return folders


def forget_images(
    client: redis.Redis, storage: Storage, settings, stored: set[str], cutoff: float, now: float, deadline: float
) -> int:
    """Delete the stored images last used before ``cutoff`` (record and index entry, then the file: a sweep that
    dies in between leaves a folder the next one adopts); index the ``stored`` image folders (``tenant/id``)
    that the index lacks. Return how many went."""
    images = ImageStore(client, settings.retention_s)
    images.adopt(sorted(stored), now)
    deleted = 0
    while time.monotonic() < deadline:
        found = images.used_before(cutoff, BATCH)
        if not found:
            break
        for tenant, image_id in found:
            if images.forget(tenant, image_id, cutoff):  # not if a job named it meanwhile
                storage.delete_prefix(image_prefix(tenant, image_id))
                deleted += 1
    return deleted


def adopt_unindexed(client: redis.Redis, stored: set[str], now: float) -> int:
    """Index the ``stored`` job folders (``tenant/job_id``) that the index lacks; return how many were added."""
    members = sorted(stored)
    adopted = 0
    for start in range(0, len(members), 1000):
        chunk = members[start : start + 1000]
        scores = client.zmscore(CREATED, chunk)
        for member, score in zip(chunk, scores, strict=True):
            if score is not None:
                continue
            record = JobStore(client, 0).get(member.rpartition("/")[2])
            # NX: a job created meanwhile keeps the time its own create wrote.
            adopted += cast(int, client.zadd(CREATED, {member: record.created_at if record else now}, nx=True))
    return adopted


def remove_stale_partials(storage: LocalStorage, older_than: float) -> int:
    removed = 0
    for path in storage.root.rglob(f"*{TEMP_SUFFIX}"):
        try:
            if path.is_file() and path.stat().st_mtime < older_than:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            pass  # its writer finished (renamed it) or another sweep took it
    return removed
