"""Object storage for inputs and results: the interface, its backends, and the key layout."""

from __future__ import annotations

from typing import TYPE_CHECKING

from storage.base import Storage

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = ["Storage", "open_storage"]


def open_storage(settings: Settings) -> Storage:
    """The backend the settings ask for: S3 when ``s3_bucket`` is set (checked at once), else the local folder."""
    if settings.s3_bucket:
        from storage.s3 import S3Storage

        storage = S3Storage.from_settings(settings)
        storage.startup_check()  # a missing bucket or refused credentials stop the process with a clear message
        return storage
    from storage.local import LocalStorage

    return LocalStorage(settings.storage_root)
