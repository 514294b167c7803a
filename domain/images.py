"""Turning uploaded bytes into an upright RGB image, refusing what is not one.

Used twice: by the web front end to refuse bad uploads before anything is
queued, and by the worker to decode the stored input. The checks run in
order of cost: size, magic bytes, the header's pixel count (so a
decompression bomb is refused without being decoded), then the decode.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from domain.errors import CorruptImage, PayloadTooLarge, UnsupportedMediaType

# Magic bytes → (format name, media type). The name must agree with what Pillow reads.
SIGNATURES: tuple[tuple[bytes, int, str, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG", "image/png"),
    (b"WEBP", 8, "WEBP", "image/webp"),
    (b"BM", 0, "BMP", "image/bmp"),
    (b"II*\x00", 0, "TIFF", "image/tiff"),
    (b"MM\x00*", 0, "TIFF", "image/tiff"),
)


# What Pillow raises for bad data. Deliberately not ``Exception``: a time limit or an
# out-of-memory error that strikes during a decode must keep its own meaning.
CORRUPT_DATA_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    AttributeError,
)


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # H x W x 3, uint8, EXIF orientation applied
    format: str
    media_type: str

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def sniff(data: bytes) -> tuple[str, str]:
    """The image format from the first bytes, never from a name or a declared type."""
    for magic, offset, fmt, media_type in SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            if fmt == "WEBP" and data[:4] != b"RIFF":
                continue
            return fmt, media_type
    raise UnsupportedMediaType("the upload is not a JPEG, PNG, WebP, BMP or TIFF image")


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> DecodedImage:
    """Check and decode ``data``; raise an :class:`~domain.errors.InputError` subclass if it is no usable image."""
    if not data:
        raise CorruptImage("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the image is {len(data)} bytes; the limit is {max_bytes}")
    fmt, media_type = sniff(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(f"the image is {width}x{height} pixels; the limit is {max_pixels} pixels")
            image.load()
            image = ImageOps.exif_transpose(image)
            pixels = to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"the image has too many pixels: {exc}") from None
    except PayloadTooLarge:
        raise
    except CORRUPT_DATA_ERRORS as exc:
        raise CorruptImage(f"the {fmt} image cannot be decoded: {exc}") from None
    return DecodedImage(pixels=pixels, format=fmt, media_type=media_type)


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode as ``H x W x 3`` uint8 RGB.

    Transparent pixels are laid on white (dark text on a transparent
    background would vanish on black), and 16/32-bit greyscale is scaled
    down rather than clipped.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = array.max() if array.size else 0
        scale = 255.0 / (65535.0 if high > 255 and image.mode != "F" else max(high, 1.0))
        grey = np.clip(array * scale, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
