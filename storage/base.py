"""The ``Storage`` interface every backend implements; the keys it is given are the domain's
(``domain.keys.job_prefix``)."""

from __future__ import annotations

from abc import ABC, abstractmethod


class Storage(ABC):
    """An object store of bytes under ``/``-separated keys.

    Backends: :class:`storage.local.LocalStorage` (a folder; the embedded
    default) and :class:`storage.s3.S3Storage` (any S3-compatible store).
    Both raise :class:`domain.errors.StorageUnavailable` when the store cannot
    be reached, and ``KeyError`` for a key that is not there.
    """

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; a missing key is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; return how many went."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]: ...

    def url(self, key: str) -> str | None:
        """A URL a client can fetch ``key`` from directly, or None (then the API serves it)."""
        return None

    def check(self) -> None:  # noqa: B027 - optional: a store with nothing to check passes
        """Raise :class:`StorageUnavailable` unless the store is usable."""

    @abstractmethod
    def identity(self) -> str:
        """A name of the store itself: processes that report the same one share their objects.

        The web checks that every worker's is its own (``webapp/health.py``): a local folder on
        two hosts is two stores, and a job's input written on one is missing on the other."""
