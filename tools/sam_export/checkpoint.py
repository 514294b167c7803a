"""What a checkpoint folder is: its family (SAM, SAM 2/2.1, SAM 3), read from ``config.json``, and what is missing.

A folder as a model hub download leaves it: ``config.json``, the weights
(``model.safetensors``, ``pytorch_model.bin`` or a sharded index), and for SAM 3
the tokenizer files. Everything here is checked before torch loads a byte, so a
wrong folder is one clear sentence, not a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

# config.json's model_type -> the family module in tools/sam_export/ that exports it.
FAMILIES = {
    "sam": "sam",
    "sam2": "sam2",
    "sam2_video": "sam2",
    "sam3": "sam3",
    "sam3_video": "sam3",
}
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# The light `tokenizers` package reads tokenizer.json; a CLIP tokenizer saved by transformers writes it
# (with vocab.json and merges.txt, which are enough to rebuild it).
TOKENIZER_FILES = ("tokenizer.json",)


class CheckpointError(Exception):
    """The folder is not a checkpoint this tool exports; the message says why and what to do."""


def read_family(folder: Path) -> str:
    """The family module's name (``sam``, ``sam2``, ``sam3``) of the checkpoint in ``folder``."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{folder}: no config.json: not a transformers checkpoint folder "
            "(download one with `hf download facebook/sam3 --local-dir DIR` on a connected machine)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not readable JSON ({exc})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise CheckpointError(
            f"{config_path}: model_type {model_type!r} is not a SAM family this tool exports "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    if not any((folder / name).is_file() for name in WEIGHTS):
        raise CheckpointError(f"{folder}: no weights (expected one of {', '.join(WEIGHTS)})")
    if family == "sam3":
        missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder}: SAM 3 needs its tokenizer for text prompts; missing {', '.join(missing)} "
                "(download the whole repository, not only the weights)"
            )
    return family


def load_error(folder: Path, exc: Exception, what: str = "the weights") -> CheckpointError:
    """A failure of ``from_pretrained`` (a truncated or corrupt weights file, or ``what`` else) as one sentence."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CheckpointError(f"{folder}: {what} could not be read ({type(exc).__name__}: {reason[:300]})")
