"""Object storage for inputs and results: the interface, its backends, and the key layout."""
from storage.base import Storage, job_prefix

__all__ = ["Storage", "job_prefix", "open_storage"]


def open_storage(settings) -> Storage:
    """The backend the settings ask for."""
    from storage.local import LocalStorage

    return LocalStorage(settings.storage_root)
