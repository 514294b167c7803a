"""Export a downloaded SAM, SAM 2/2.1 or SAM 3 checkpoint folder to the ONNX parts maskq serves.

Usage (needs the optional extra: ``pip install -r requirements-sam.txt``; torch is
needed only here, never by the service)::

    python tools/export_sam.py CHECKPOINT_DIR OUT_DIR [--name NAME]
    python tools/export_sam.py --tiny-random [--family sam2] OUT_DIR   # the small random models the tests use

``CHECKPOINT_DIR`` is a transformers checkpoint folder as a model hub download
leaves it (``config.json``, the weights, for SAM 3 the tokenizer files), read
with ``local_files_only``: nothing is fetched. Its ``model_type`` picks the
family (tools/sam_export/checkpoint.py); each family's module writes its parts:

* ``sam`` (tools/sam_export/sam.py): ``encoder.onnx`` + ``decoder.onnx``.
* ``sam2`` / ``sam2_video`` (tools/sam_export/sam2.py): the same two roles, the
  encoder also giving the high-resolution features the SAM 2 decoder takes.
* ``sam3`` / ``sam3_video`` (tools/sam_export/sam3.py): ``vision_encoder``,
  ``text_encoder`` (+ ``tokenizer.json``), ``detector`` and ``exemplar_detector``
  (concept prompts: phrases, exemplar boxes).

Each part is run in ONNX Runtime against PyTorch on the same inputs (``--no-check``
skips it). The tool then writes ``OUT_DIR/manifest.toml`` (and prints it): the
``[models.NAME]`` table, with every file's sha256, to paste into ``config/models.toml``.
A folder that is not such a checkpoint is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path, as for `python -m`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.sam_export.checkpoint import FAMILIES, CheckpointError, read_family
from tools.sam_export.common import ExportOptions, manifest_entry


def quiet_torch() -> None:
    """No gradients, no progress bars, only transformers' errors: the tool's own lines are what it prints."""
    import torch
    import transformers

    torch.set_grad_enabled(False)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, help="a transformers checkpoint folder")
    parser.add_argument("out_dir", type=Path, help="where the ONNX parts and manifest.toml go")
    parser.add_argument(
        "--tiny-random",
        action="store_true",
        help="build a small random model of --family (saved to OUT_DIR/checkpoint) instead of reading one",
    )
    parser.add_argument("--family", choices=sorted(set(FAMILIES.values())), default="sam", help="of --tiny-random")
    parser.add_argument("--seed", type=int, default=0, help="seed of --tiny-random")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the family's)")
    parser.add_argument(
        "--encoder-input",
        choices=("normalized", "resized"),
        default="normalized",
        help="SAM only. normalized: [1, 3, S, S] preprocessed (the official layout); resized: [h, w, 3] "
        "RGB with normalisation and padding inside the graph (samexporter --use-preprocess)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime check against PyTorch")
    parser.add_argument("--name", default=None, help="the model's name in the manifest entry (default: the family)")
    args = parser.parse_args(argv)
    if not args.tiny_random and args.checkpoint is not None:
        try:  # before torch is imported (seconds): a wrong folder is told at once
            read_family(args.checkpoint)
        except CheckpointError as exc:
            print(f"export_sam: {exc}", file=sys.stderr)
            return 2
    quiet_torch()
    if args.tiny_random:
        family = args.family
        module = importlib.import_module(f"tools.sam_export.{family}")
        # Saved and read back, so the tests go through the same from_pretrained path as real weights.
        args.checkpoint = args.out_dir / "checkpoint"
        args.checkpoint.mkdir(parents=True, exist_ok=True)
        module.tiny_random_checkpoint(args.checkpoint, args.seed)
    elif args.checkpoint is None:
        parser.error("give a checkpoint folder or --tiny-random")
    try:
        family = read_family(args.checkpoint)
        module = importlib.import_module(f"tools.sam_export.{family}")
        options = ExportOptions(check=not args.no_check, encoder_input=args.encoder_input)
        if args.opset is not None:
            options = ExportOptions(opset=args.opset, check=options.check, encoder_input=args.encoder_input)
        elif hasattr(module, "OPSET"):
            options = ExportOptions(opset=module.OPSET, check=options.check, encoder_input=args.encoder_input)
        started = time.perf_counter()
        exported = module.export_checkpoint(args.checkpoint, args.out_dir, options)
    except CheckpointError as exc:
        print(f"export_sam: {exc}", file=sys.stderr)
        return 2
    print(f"{family}: exported {len(exported.files)} files in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if exported.timings:
        parts = ", ".join(f"{part} {seconds * 1000:.0f} ms" for part, seconds in exported.timings.items())
        print(f"ONNX Runtime matches PyTorch; one run of each part: {parts}", file=sys.stderr)
    version = f"tiny-random-{family}-{args.seed}" if args.tiny_random else args.checkpoint.resolve().name
    entry = manifest_entry(args.name or family, version, exported)
    (args.out_dir / "manifest.toml").write_text(entry)
    print(entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
