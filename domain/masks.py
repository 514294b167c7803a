"""Masks as COCO run-length encoding (pycocotools), and as PNG files.

COCO RLE is column-major (Fortran order) over an ``H x W`` mask; ``counts``
is the compressed string form pycocotools writes. ``bbox`` is
``[x, y, w, h]`` in pixels.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

Rle = dict[str, Any]  # {"size": [h, w], "counts": str}


def encode(mask: np.ndarray) -> Rle:
    """A boolean ``H x W`` mask as ``{"size": [h, w], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def describe(rle: Rle) -> tuple[list[float], int]:
    """``(bbox, area)`` of an encoded mask, computed by pycocotools from the runs."""
    coco = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    bbox = [float(v) for v in mask_utils.toBbox(coco)]
    return bbox, int(mask_utils.area(coco))


def decode(rle: Rle) -> np.ndarray:
    """A validated RLE back to a boolean ``H x W`` mask."""
    check_counts(rle["counts"], rle["size"][0] * rle["size"][1])
    coco = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    mask: np.ndarray = mask_utils.decode(coco).astype(bool)
    return mask


def check_counts(counts: str, pixels: int) -> None:
    """Raise ``ValueError`` unless ``counts`` is a well-formed compressed RLE of exactly ``pixels`` pixels.

    pycocotools' C decoder trusts its input (runs that add up to more than
    the mask overflow its buffer), so client-supplied masks pass here first.
    This mirrors ``rleFrString`` in pycocotools' ``maskApi.c``, in linear time:
    no run may take more characters than a run as long as the whole mask, so
    a run that never ends stops the parse at once, and so does a sum that
    passes the mask's size. The messages speak of the request.
    """
    # Runs are coded 5 bits a character, plus a sign bit in the last one (and a delta to the run two back).
    most_chars = (max(pixels, 1).bit_length() + 1) // 5 + 2
    if len(counts) > (pixels + 1) * most_chars:
        raise ValueError(f"counts is {len(counts)} characters long; a mask of {pixels} pixels needs far fewer")
    runs: list[int] = []
    total, position = 0, 0
    while position < len(counts):
        start, value, shift, more = position, 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError("counts ends in the middle of a run")
            if position - start >= most_chars:
                raise ValueError(f"counts has a run (at character {start}) longer than the whole {pixels}-pixel mask")
            c = ord(counts[position]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {counts[position]!r} at character {position} of counts")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            position += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError(f"counts has a negative run length (at character {start})")
        total += value
        if total > pixels:
            raise ValueError(f"counts covers more than the mask's {pixels} pixels (by character {position})")
        runs.append(value)
    if total != pixels:
        raise ValueError(f"counts covers {total} pixels; the mask has {pixels}")


def to_png(mask: np.ndarray) -> bytes:
    """A mask as a 1-bit PNG (white = inside)."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(bool)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
