"""The job as clients see it: its record plus its stored result, with file links.

One home for the API's ``GET /v1/jobs/{id}`` body and the webhook body
(which must be equal to it).
"""
from __future__ import annotations

import json
from typing import Protocol

from domain.keys import job_prefix
from domain.records import JobRecord


class ResultStore(Protocol):
    """What a document needs of object storage (any ``storage.Storage`` backend is one)."""

    def get(self, key: str) -> bytes: ...

    def url(self, key: str) -> str | None: ...


def job_result(record: JobRecord, storage: ResultStore, base_url: str) -> dict | None:
    """The stored result with ``png_url``/``input_url`` links (presigned where the store can, else the API's)."""
    if record.result_key is None:
        return None
    result = json.loads(storage.get(record.result_key))
    prefix = job_prefix(record.tenant, record.id)

    def file_url(key: str) -> str:
        return storage.url(key) or f"{base_url.rstrip('/')}/v1/jobs/{record.id}/files/{key[len(prefix):]}"

    for instance in result["instances"]:
        key = instance.pop("png_key", None)
        if key:
            instance["png_url"] = file_url(key)
    result["input_url"] = file_url(record.input_key)
    return result


def job_document(record: JobRecord, storage: ResultStore, base_url: str) -> dict:
    return record.document(job_result(record, storage, base_url))
