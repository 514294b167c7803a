"""Reading the images out of an uploaded zip or tar (``POST /v1/batches`` with an ``archive`` part), bounded.

Nothing is ever written to disk and member names are only labels, so a
``../`` name cannot escape anywhere. What a hostile archive could cost is
bounded before it is paid: the number of members, each image's size (read
at most one byte past the limit, whatever the member claims), and the sum
of the sizes the members declare (a tar.gz member skipped still has to be
decompressed, so a huge one is refused on its header).
"""
from __future__ import annotations

import io
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO, Iterator

from domain.errors import InputError, PayloadTooLarge

MAX_ZIP_MEMBERS = 20_000  # images and everything else (folders, notes) a zip may list
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class Member:
    """One image of the archive: its bytes, or why it was left out (``too_large``)."""

    name: str
    data: bytes = b""
    too_large: bool = False


def is_image_name(name: str) -> bool:
    path = PurePosixPath(name)
    hidden = any((part.startswith(".") and part not in (".", "..")) or part == "__MACOSX" for part in path.parts)
    return not hidden and path.suffix.lower() in IMAGE_SUFFIXES


def read_archive(stream: BinaryIO, *, max_images: int, max_image_bytes: int, max_total_bytes: int) -> list[Member]:
    """The image members of a zip or a (compressed) tar, in archive order.

    Raises ``PayloadTooLarge`` (413) past ``max_images`` images or ``max_total_bytes`` declared or read,
    ``InputError`` (400) for something that is neither a zip nor a tar.
    """
    head = stream.read(4)
    stream.seek(0)
    members = _zip_members(stream) if head.startswith(b"PK") else _tar_members(stream)
    out: list[Member] = []
    declared = read = 0
    for name, size, open_member in members:
        if not is_image_name(name):
            continue
        if len(out) >= max_images:
            raise PayloadTooLarge(f"the archive holds more than {max_images} images (MASKQ_MAX_BATCH_IMAGES)")
        declared += size
        if declared > max_total_bytes:
            raise PayloadTooLarge(f"the archive's images come to more than {max_total_bytes} bytes "
                                  "(MASKQ_MAX_BATCH_BYTES)")
        if size > max_image_bytes:
            out.append(Member(name, too_large=True))
            continue
        try:
            with open_member() as member:
                data = member.read(max_image_bytes + 1)  # a member may lie about its size: never read past the limit
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, NotImplementedError, RuntimeError,
                zlib.error) as exc:  # a bad CRC, an encrypted or unknown-compression member, a cut-off stream
            raise InputError(f"the archive member {name!r} cannot be read: {exc}") from None
        read += len(data)
        if read > max_total_bytes:
            raise PayloadTooLarge(f"the archive's images come to more than {max_total_bytes} bytes")
        out.append(Member(name, too_large=True) if len(data) > max_image_bytes else Member(name, data))
    return out


def _zip_members(stream: BinaryIO) -> Iterator[tuple[str, int, object]]:
    # A zip's members are all parsed when it opens: count them first from its end record, so a
    # few megabytes of empty members cannot cost gigabytes of memory.
    end = zipfile._EndRecData(stream)  # (stable since Python 2; the only way to read the count unparsed)
    stream.seek(0)
    if end and end[zipfile._ECD_ENTRIES_TOTAL] > MAX_ZIP_MEMBERS:
        raise PayloadTooLarge(f"the zip has more than {MAX_ZIP_MEMBERS} members")
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"the archive is not a readable zip: {exc}") from None
    for info in archive.infolist():
        if not info.is_dir():
            yield info.filename, info.file_size, lambda info=info: archive.open(info)


def _tar_members(stream: BinaryIO) -> Iterator[tuple[str, int, object]]:
    try:
        archive = tarfile.open(fileobj=stream, mode="r:*")
    except (tarfile.TarError, OSError, EOFError):
        raise InputError("the archive is neither a zip nor a tar (plain, .gz, .bz2 or .xz)") from None
    try:
        for info in archive:
            if info.isfile():
                yield info.name, info.size, lambda info=info: archive.extractfile(info) or io.BytesIO()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"the tar archive is damaged: {exc}") from None
