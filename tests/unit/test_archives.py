"""Reading images out of an uploaded zip or tar: what is taken, what is left out, what is refused unread."""

from __future__ import annotations

import bz2
import gc
import gzip
import io
import struct
import tarfile
import time
import tracemalloc
import zipfile

import pytest

from domain.archives import MAX_ARCHIVE_MEMBERS, iter_archive
from domain.errors import InputError, PayloadTooLarge

LIMITS = {"max_images": 5, "max_image_bytes": 100, "max_total_bytes": 1000}


def read_archive(stream, **limits) -> list:
    return list(iter_archive(stream, **limits))


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


# -- hostile archives (issue 22: findings 1 and 2) --------------------------------------------------


class CountingReader(io.BytesIO):
    """The upload, counting the bytes the reader takes from it."""

    taken = 0

    def read(self, size=-1):
        data = super().read(size)
        self.taken += len(data)
        return data


def header(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "a.jpg"
    return info.tobuf(format=tarfile.GNU_FORMAT)


def test_a_tiny_tar_bz2_holding_300_mb_of_notes_is_refused_on_its_header_not_decompressed():
    # 300 one-megabyte bzip2 streams of zeros after the header's: a 14 kB upload that inflates to 300 MB.
    mib = bz2.compress(bytes(2**20))
    bomb = bz2.compress(header("notes.bin", 300 * 2**20)) + mib * 300 + bz2.compress(bytes(10240))
    assert len(bomb) < 20_000
    started = time.perf_counter()
    with pytest.raises(PayloadTooLarge, match="MASKQ_MAX_BATCH_BYTES"):
        read_archive(io.BytesIO(bomb), **{**LIMITS, "max_total_bytes": 256 * 2**20})
    assert time.perf_counter() - started < 0.2  # decompressing it all takes most of a second


def test_a_skipped_member_is_counted_before_it_is_skipped_so_the_stream_is_not_read_past_it():
    mib = gzip.compress(bytes(2**20))
    bomb = CountingReader(gzip.compress(header(".hidden", 300 * 2**20)) + mib * 300)
    with pytest.raises(PayloadTooLarge):
        read_archive(bomb, **LIMITS)
    assert bomb.taken < len(bomb.getvalue()) / 2  # (it reads ahead a buffer's worth, not the rest)


def test_hidden_files_folders_and_links_count_against_the_total_and_the_member_cap():
    notes = b"".join(header(f".cache/{n}", 400) + bytes(512) for n in range(3)) + header("a.jpg", 10) + bytes(512)
    with pytest.raises(PayloadTooLarge, match="members come to more than 1000"):
        read_archive(io.BytesIO(gzip.compress(notes + bytes(1024))), **LIMITS)
    # 100k empty members (hidden files, folders, links): a few hundred kB that were once all accepted.
    kinds = header("._a.jpg") + header("d/", kind=tarfile.DIRTYPE) + header("l.jpg", kind=tarfile.SYMTYPE)
    many = gzip.compress(kinds * 33_334 + bytes(1024), compresslevel=1)
    assert len(many) < 1_000_000
    started = time.perf_counter()
    with pytest.raises(PayloadTooLarge, match=f"more than {MAX_ARCHIVE_MEMBERS} members"):
        read_archive(io.BytesIO(many), **LIMITS)
    assert time.perf_counter() - started < 2


def test_a_huge_pax_header_is_refused_without_being_read_into_memory():
    info = tarfile.TarInfo("a.jpg")
    info.pax_headers = {"comment": "x" * 50_000_000}  # tarfile reads a pax header whole
    blob = bz2.compress(info.tobuf(format=tarfile.PAX_FORMAT) + bytes(1024))
    gc.collect()  # what earlier tests left is not this test's to free
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge, match="headers"):
            read_archive(io.BytesIO(blob), **LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20


def test_the_tar_list_of_members_is_not_kept():
    blob = gzip.compress(b"".join(header(f"{n}.txt") for n in range(10_000)) + bytes(1024))
    gc.collect()  # what earlier tests left is not this test's to free
    tracemalloc.start()
    try:
        assert read_archive(io.BytesIO(blob), **LIMITS) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20  # 10k TarInfo kept come to about 5 MB


def forged_zip(entries: int, count: int) -> bytes:
    """A zip of ``entries`` empty members whose end record counts ``count``."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for n in range(entries):
            archive.writestr(f"{n}.txt", b"")
    blob = bytearray(out.getvalue())
    struct.pack_into("<HH", blob, len(blob) - 22 + 8, count, count)  # entries on this disk, in total
    return bytes(blob)


def test_a_zip_whose_end_record_undercounts_its_central_directory_is_refused_before_it_is_parsed():
    with pytest.raises(InputError, match="more entries than the 2"):
        read_archive(io.BytesIO(forged_zip(3, 2)), **LIMITS)
    with pytest.raises(InputError, match="holds 3 entries, its end record counts 4"):
        read_archive(io.BytesIO(forged_zip(3, 4)), **LIMITS)
    many = forged_zip(30_000, 1)
    gc.collect()  # what earlier tests left is not this test's to free
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(PayloadTooLarge, match="central directory"):
            read_archive(io.BytesIO(many), **LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20 and time.perf_counter() - started < 0.5  # parsed, 30k entries take ~10 MB
    with pytest.raises(PayloadTooLarge, match=f"more than {MAX_ARCHIVE_MEMBERS} members"):
        read_archive(io.BytesIO(forged_zip(MAX_ARCHIVE_MEMBERS + 1, MAX_ARCHIVE_MEMBERS + 1)), **LIMITS)
