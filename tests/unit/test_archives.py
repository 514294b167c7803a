"""Reading images out of an uploaded zip or tar: what is taken, what is left out, what is refused unread."""
from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from domain.archives import read_archive
from domain.errors import InputError, PayloadTooLarge

LIMITS = {"max_images": 5, "max_image_bytes": 100, "max_total_bytes": 1000}


def tar_of(members: dict[str, int], mode: str = "w:gz") -> io.BytesIO:
    """A tar whose members claim these sizes (their bytes are zeros)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as archive:
        for name, size in members.items():
            info = tarfile.TarInfo(name)
            info.size = size
            archive.addfile(info, io.BytesIO(b"\0" * size))
    out.seek(0)
    return out


def test_images_are_taken_in_order_and_everything_else_is_left_out():
    found = read_archive(tar_of({"b.jpg": 3, ".hidden.jpg": 3, "notes.txt": 3, "a/c.PNG": 4}), **LIMITS)
    assert [(m.name, len(m.data), m.too_large) for m in found] == [("b.jpg", 3, False), ("a/c.PNG", 4, False)]


def test_an_image_over_the_limit_is_listed_as_too_large_not_read():
    found = read_archive(tar_of({"big.jpg": 500, "ok.jpg": 10}, mode="w"), **LIMITS)
    assert [(m.name, m.too_large, m.data) for m in found] == [("big.jpg", True, b""), ("ok.jpg", False, b"\0" * 10)]


def test_the_declared_total_and_the_count_are_refused_before_anything_is_inflated():
    with pytest.raises(PayloadTooLarge):
        read_archive(tar_of({f"{n}.jpg": 90 for n in range(12)}), **{**LIMITS, "max_images": 50})
    with pytest.raises(PayloadTooLarge):
        read_archive(tar_of({f"{n}.jpg": 1 for n in range(6)}), **LIMITS)


def test_a_zip_is_read_like_a_tar_folders_and_mac_droppings_left_out():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("shots/", b"")
        archive.writestr("shots/a.jpg", b"x" * 50)
        archive.writestr("__MACOSX/shots/._a.jpg", b"junk")
    out.seek(0)
    assert [(m.name, len(m.data)) for m in read_archive(out, **LIMITS)] == [("shots/a.jpg", 50)]


def test_garbage_and_a_truncated_archive_are_400s():
    with pytest.raises(InputError):
        read_archive(io.BytesIO(b"GIF89a not an archive at all" * 30), **LIMITS)
    whole = tar_of({"a.jpg": 50, "b.jpg": 50}).getvalue()
    with pytest.raises(InputError):
        read_archive(io.BytesIO(whole[: len(whole) // 2]), **LIMITS)
