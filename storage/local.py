"""A folder on the local disk as object storage: the embedded default."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from domain.errors import StorageUnavailable
from storage.base import Storage

TEMP_SUFFIX = ".partial"
IDENTITY_FILE = ".maskq-store"  # a random name made once per folder: who shares this folder shares it


class LocalStorage(Storage):
    """Objects as files under ``root``; writes are atomic (temp file, then rename)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._identity: str | None = None

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if key.startswith("/") or not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"invalid storage key {key!r}")
        return path

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=TEMP_SUFFIX)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageUnavailable(f"cannot write {key}: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read {key}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root))
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(TEMP_SUFFIX) and p.name != IDENTITY_FILE
        )

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        return len(keys)

    def check(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise StorageUnavailable(f"storage folder {self.root} is not a writable folder")

    def identity(self) -> str:
        if self._identity is None:  # read once: a folder keeps its name (every /readyz asks)
            try:
                self._identity = self._read_or_make_identity()
            except OSError as exc:
                raise StorageUnavailable(f"cannot name the storage folder {self.root}: {exc}") from exc
        return self._identity

    def _read_or_make_identity(self) -> str:
        path = self.root / IDENTITY_FILE
        if not path.exists():  # the first process to ask names the folder (atomically: a link of a whole file)
            fd, tmp = tempfile.mkstemp(dir=self.root, suffix=TEMP_SUFFIX)
            with os.fdopen(fd, "w") as f:
                f.write(f"local:{uuid.uuid4().hex}")
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        return path.read_text().strip()
