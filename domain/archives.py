"""Reading the images out of an uploaded zip or tar (``POST /v1/batches`` with an ``archive`` part), bounded.

Nothing is ever written to disk and member names are only labels, so a
``../`` name cannot escape anywhere. Images come one at a time (a caller
holds one, drops it, takes the next). What a hostile archive could cost is
bounded before it is paid:

- every member, of every type (folders, links, hidden files, notes), counts
  against :data:`MAX_ARCHIVE_MEMBERS`, and its declared size against the
  total, *before* it is skipped (a tar member skipped is still decompressed);
- each image is read at most one byte past its limit, whatever it claims;
- a zip's central directory is bounded by its size and must hold as many
  entries as its end record says, checked before ``zipfile`` parses it;
- a tar is decompressed here, counted, and stopped once it passes the total
  (plus room for headers), or once one member's headers pass
  :data:`MAX_TAR_HEADER_BYTES` (``tarfile`` reads those whole into memory);
  ``tarfile`` is read as a stream and its list of members is not kept.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import lzma
import os
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol

from domain.errors import InputError, PayloadTooLarge

MAX_ARCHIVE_MEMBERS = 20_000  # images and everything else (folders, links, notes) a zip or tar may hold
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
# A zip's central directory: 46 bytes an entry plus, on average, this much name, extra field and comment.
ZIP_ENTRY_NAME_BYTES = 1024
# Headers and padding a tar adds to its members' bytes (about 1.5 kB a member at the member cap).
TAR_OVERHEAD_BYTES = 32 * 1024 * 1024
MAX_TAR_HEADER_BYTES = 1024 * 1024  # one member's headers (pax, GNU long names, sparse maps)

# zipfile's names for the parts of its records: stable since Python 2, private, and left out of typeshed.
_zip: Any = zipfile
_CD_ENTRY = struct.Struct(_zip.structCentralDir)
_READ_ERRORS = (
    zipfile.BadZipFile,
    tarfile.TarError,
    OSError,
    EOFError,
    NotImplementedError,
    RuntimeError,
    zlib.error,
    lzma.LZMAError,
)  # a bad CRC, an encrypted or unknown member, a cut-off stream


@dataclass(frozen=True)
class Member:
    """One image of the archive: its bytes, or why it was left out (``too_large``)."""

    name: str
    data: bytes = b""
    too_large: bool = False


def is_image_name(name: str) -> bool:
    # Plain string work: pathlib would intern every part of every name an archive lists.
    parts = [part for part in name.split("/") if part]
    hidden = any((part.startswith(".") and part not in (".", "..")) or part == "__MACOSX" for part in parts)
    return bool(parts) and not hidden and os.path.splitext(parts[-1])[1].lower() in IMAGE_SUFFIXES


def iter_archive(stream: IO[bytes], *, max_images: int, max_image_bytes: int, max_total_bytes: int) -> Iterator[Member]:
    """The image members of a zip or a (compressed) tar, one at a time, in archive order.

    Raises ``PayloadTooLarge`` (413) past :data:`MAX_ARCHIVE_MEMBERS` members, ``max_images`` images or
    ``max_total_bytes`` declared or decompressed, ``InputError`` (400) for something that is neither a
    zip nor a tar, or is damaged. ``stream`` must be seekable; it is read from its start.
    """
    stream.seek(0)
    head = stream.read(6)
    stream.seek(0)
    entries = _zip_entries(stream) if head.startswith(b"PK") else _tar_entries(stream, head, max_total_bytes)
    count = images = declared = 0
    try:
        for name, size, is_file, open_member in entries:
            count += 1
            if count > MAX_ARCHIVE_MEMBERS:
                raise PayloadTooLarge(f"the archive has more than {MAX_ARCHIVE_MEMBERS} members (of any type)")
            declared += size  # every member, image or not: a tar member skipped is still decompressed
            if declared > max_total_bytes:
                raise PayloadTooLarge(
                    f"the archive's members come to more than {max_total_bytes} bytes (MASKQ_MAX_BATCH_BYTES)"
                )
            if not is_file or not is_image_name(name):
                continue
            images += 1
            if images > max_images:
                raise PayloadTooLarge(f"the archive holds more than {max_images} images (MASKQ_MAX_BATCH_IMAGES)")
            if size > max_image_bytes:
                yield Member(name, too_large=True)
                continue
            with open_member() as member:
                # A member may lie about its size: never read past the limit (nor ask for a buffer past its size).
                data = member.read(min(size, max_image_bytes) + 1)
            yield Member(name, too_large=True) if len(data) > max_image_bytes else Member(name, data)
    except _READ_ERRORS as exc:
        raise InputError(f"the archive cannot be read: {exc}") from None


def _zip_entries(stream: IO[bytes]) -> Iterator[tuple[str, int, bool, Callable[[], IO[bytes]]]]:
    _check_central_directory(stream)
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"the archive is not a readable zip: {exc}") from None
    for info in archive.infolist():
        yield info.filename, info.file_size, not info.is_dir(), functools.partial(archive.open, info)


def _check_central_directory(stream: IO[bytes]) -> None:
    """Bound a zip's central directory before ``zipfile`` reads it whole and parses every entry in it.

    ``zipfile`` parses entries until the directory's *size* is used up, whatever the *count* in the end
    record says; so the size is bounded by the count, and the entries are walked (their fixed part
    alone) to check that there are exactly as many as counted.
    """
    end = _zip._EndRecData(stream)  # (stable since Python 2; the only way to read these unparsed)
    if not end:
        raise InputError("the archive is not a readable zip: it has no end of central directory record")
    count, size = end[_zip._ECD_ENTRIES_TOTAL], end[_zip._ECD_SIZE]
    if count > MAX_ARCHIVE_MEMBERS:
        raise PayloadTooLarge(f"the zip has more than {MAX_ARCHIVE_MEMBERS} members (of any type)")
    if size > count * (_CD_ENTRY.size + ZIP_ENTRY_NAME_BYTES) + 65536:  # room for a few long names
        raise PayloadTooLarge(
            f"the zip's central directory ({size} bytes) is too large for the {count} entries its end record counts"
        )
    start = end[_zip._ECD_LOCATION] - size  # where zipfile looks for it, prepended data included
    if end[_zip._ECD_SIGNATURE] == _zip.stringEndArchive64:
        start -= _zip.sizeEndCentDir64 + _zip.sizeEndCentDir64Locator
    stream.seek(max(start, 0))
    seen = walked = 0
    while walked < size:
        fixed = stream.read(_CD_ENTRY.size)
        if len(fixed) < _CD_ENTRY.size or fixed[:4] != _zip.stringCentralDir:
            raise InputError("the archive is not a readable zip: its central directory is damaged")
        seen += 1
        if seen > count:
            raise InputError(f"the zip's central directory holds more entries than the {count} its end record counts")
        entry = _CD_ENTRY.unpack(fixed)
        rest = entry[_zip._CD_FILENAME_LENGTH] + entry[_zip._CD_EXTRA_FIELD_LENGTH] + entry[_zip._CD_COMMENT_LENGTH]
        stream.seek(rest, 1)
        walked += _CD_ENTRY.size + rest
    if seen != count:
        raise InputError(f"the zip's central directory holds {seen} entries, its end record counts {count}")
    stream.seek(0)


def _tar_entries(
    stream: IO[bytes], head: bytes, max_total_bytes: int
) -> Iterator[tuple[str, int, bool, Callable[[], IO[bytes]]]]:
    raw = _decompressed(stream, head)
    counted = _CountedStream(raw, ceiling=max_total_bytes + TAR_OVERHEAD_BYTES)
    counted.allow(MAX_TAR_HEADER_BYTES)
    try:
        # A stream ("r|"): read forwards once, every byte through ``counted`` (typeshed asks for a seekable
        # file). Not a `with`: it is read across the yields below, and the caller owns the stream.
        archive = tarfile.open(fileobj=counted, mode="r|")  # type: ignore[call-overload]  # noqa: SIM115
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError):
        raise InputError("the archive is neither a zip nor a tar (plain, .gz, .bz2 or .xz)") from None
    while (info := archive.next()) is not None:
        archive.members.clear()  # tarfile keeps every member it reads; none is looked up again here
        # This member's data, then the next member's headers, and no more.
        counted.allow(archive.offset + MAX_TAR_HEADER_BYTES)
        yield info.name, info.size, info.isfile(), functools.partial(_tar_member, archive, info)


def _tar_member(archive: tarfile.TarFile, info: tarfile.TarInfo) -> IO[bytes]:
    member = archive.extractfile(info)
    if member is None:  # only a regular file's is asked for
        raise InputError(f"the archive member {info.name} cannot be read")
    return member


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _decompressed(stream: IO[bytes], head: bytes) -> _Readable:
    """The tar inside ``stream``: decompressed here (as it is read), so that every byte can be counted."""
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(stream)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(stream)
    return stream


class _CountedStream:
    """A forward-only reader that refuses (413) to hand out more bytes than allowed so far.

    ``allow`` moves the bound as the tar's members are seen; ``ceiling`` is the most the whole tar may
    decompress to.
    """

    def __init__(self, raw: _Readable, ceiling: int) -> None:
        self.raw = raw
        self.ceiling = ceiling
        self.limit = 0
        self.count = 0

    def allow(self, upto: int) -> None:
        # tarfile reads ahead a record at a time.
        self.limit = min(upto + tarfile.RECORDSIZE, self.ceiling)

    def read(self, size: int = -1) -> bytes:
        room = self.limit - self.count + 1  # one byte past the bound tells that it was passed
        data = self.raw.read(room if size < 0 else min(size, room))
        self.count += len(data)
        if self.count > self.limit:
            if self.limit == self.ceiling:
                raise PayloadTooLarge(
                    f"the tar decompresses to more than {self.ceiling} bytes "
                    "(MASKQ_MAX_BATCH_BYTES, and room for its headers)"
                )
            raise PayloadTooLarge(f"a tar member's headers come to more than {MAX_TAR_HEADER_BYTES} bytes")
        return data
