"""IDX files (the MNIST format), checked against their header and read a few rows at a time.

Format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a big-endian header, two zero bytes,
a type byte (``0x08``: unsigned byte), the number of dimensions, then one ``uint32`` per
dimension; the payload follows in row-major order. Files may be gzipped (``.gz``).

Reading only some rows keeps a role's memory at the size of what it keeps:

* plain files are memory-mapped one window (``WINDOW_BYTES``) at a time, and only windows
  holding a wanted row are mapped; memray counts a mapping as an allocation of its length,
  so one map over a 47 MB file would read as 47 MB;
* ``.gz`` files are decompressed in one pass, a window at a time, keeping the wanted rows.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

UBYTE = 0x08
WINDOW_BYTES = 1 << 20  # bytes mapped or decompressed at a time


class IdxFormatError(ValueError):
    """An IDX file whose bytes disagree with its header or with what the dataset expects."""


@dataclass(frozen=True)
class IdxHeader:
    path: Path
    dims: tuple[int, ...]  # [N, *row_shape]
    offset: int            # header bytes, where the payload starts

    @property
    def count(self) -> int:
        return self.dims[0]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.dims[1:], dtype=np.int64))

    @property
    def payload_bytes(self) -> int:
        return self.count * self.row_bytes


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_header(path: Path, ndim: int) -> IdxHeader:
    """Read and check the header of an unsigned-byte IDX file with ``ndim`` dimensions.

    For a plain file its size must be the header plus the payload the header announces (a gzipped
    file's length is checked when it is read). Raises IdxFormatError naming the file, what it holds
    and what was expected.
    """
    what = f"an IDX file of unsigned bytes with {ndim} dimension{'s' if ndim > 1 else ''}"
    try:
        with _open(path) as fh:
            head = fh.read(4)
            if len(head) < 4 or head[:2] != b"\0\0":
                raise IdxFormatError(f"{path}: not an IDX file (starts with {head.hex() or 'nothing'}, expected "
                                     f"0000{UBYTE:02x}{ndim:02x}: {what}); replace it with the dataset's file")
            if head[2] != UBYTE or head[3] != ndim:
                raise IdxFormatError(f"{path}: IDX type 0x{head[2]:02x} with {head[3]} dimensions, expected {what}; "
                                     f"is it the right file?")
            raw = fh.read(4 * ndim)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise IdxFormatError(f"{path}: unreadable ({type(exc).__name__}: {exc}); replace it with the dataset's file")\
            from exc
    if len(raw) < 4 * ndim:
        raise IdxFormatError(f"{path}: truncated inside its header ({4 + len(raw)} of {4 + 4 * ndim} bytes)")
    header = IdxHeader(path, struct.unpack(f">{ndim}I", raw), 4 + 4 * ndim)
    if path.suffix != ".gz":
        size, expected = path.stat().st_size, header.offset + header.payload_bytes
        if size != expected:
            raise IdxFormatError(
                f"{path}: {size} bytes, but its header announces {' x '.join(map(str, header.dims))} unsigned bytes "
                f"({expected} bytes with the header); the file is {'truncated' if size < expected else 'too long'}, "
                f"replace it with the dataset's file")
    return header


def read_rows(header: IdxHeader, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (indices into the first dimension, any order) as ``uint8`` ``[len(rows), *dims[1:]]``.

    Holds the result plus about ``WINDOW_BYTES`` (bytes). A gzipped file is read to its end, so a
    truncated or over-long one raises IdxFormatError even when the wanted rows come first.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= header.count):
        raise IdxFormatError(f"{header.path}: row {int(rows.max())} asked for, but the file holds {header.count}")
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    out = np.empty((len(rows), *header.dims[1:]), dtype=np.uint8)
    per_window = max(1, WINDOW_BYTES // max(1, header.row_bytes))
    plain = header.path.suffix != ".gz"
    with (open(header.path, "rb") if plain else gzip.open(header.path, "rb")) as fh:
        if not plain:
            fh.read(header.offset)
            window = np.empty((per_window, *header.dims[1:]), dtype=np.uint8)
        for start in range(0, header.count, per_window):
            stop = min(header.count, start + per_window)
            lo, hi = np.searchsorted(wanted, [start, stop])
            if plain:
                if lo == hi:
                    continue  # no wanted row here: nothing is mapped
                mapped = np.memmap(fh, dtype=np.uint8, mode="r", offset=header.offset + start * header.row_bytes,
                                   shape=(stop - start, *header.dims[1:]))
                out[order[lo:hi]] = mapped[wanted[lo:hi] - start]
                del mapped
            else:
                _read_exactly(fh, window[: stop - start], header, start)
                out[order[lo:hi]] = window[wanted[lo:hi] - start]
        if not plain and fh.read(1):
            raise IdxFormatError(f"{header.path}: longer than the {header.payload_bytes} payload bytes its header "
                                 f"announces; replace it with the dataset's file")
    return out


def read_all(header: IdxHeader) -> np.ndarray:
    """The whole payload as ``uint8`` ``header.dims`` (for small files: labels)."""
    return read_rows(header, np.arange(header.count))


def _read_exactly(fh, window: np.ndarray, header: IdxHeader, start: int) -> None:
    view, got = memoryview(window).cast("B"), 0
    try:
        while got < len(view):
            n = fh.readinto(view[got:])
            if not n:
                break
            got += n
    except (OSError, EOFError, zlib.error) as exc:
        raise IdxFormatError(f"{header.path}: unreadable after row {start} ({type(exc).__name__}: {exc}); "
                             f"replace it with the dataset's file") from exc
    if got < len(view):
        held = header.offset + start * header.row_bytes + got
        raise IdxFormatError(f"{header.path}: truncated: {held} bytes uncompressed, but its header announces "
                             f"{' x '.join(map(str, header.dims))} unsigned bytes "
                             f"({header.offset + header.payload_bytes} bytes with the header)")
