"""Image decoding's error mapping (pure logic on in-memory bytes)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from domain import images
from domain.errors import CorruptImage


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_a_truncated_image_is_a_corrupt_image():
    with pytest.raises(CorruptImage):
        images.decode_image(jpeg()[:60], max_bytes=10**6, max_pixels=10**6)


def test_an_interruption_during_decoding_keeps_its_own_type(monkeypatch):
    """A Celery time limit (an ``Exception``) striking mid-decode must not pass for bad input."""

    class Interrupted(Exception):
        pass

    def interrupt(image):
        raise Interrupted()

    monkeypatch.setattr(images.ImageOps, "exif_transpose", interrupt)
    with pytest.raises(Interrupted):
        images.decode_image(jpeg(), max_bytes=10**6, max_pixels=10**6)
