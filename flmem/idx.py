"""IDX files (the MNIST format), checked against their header and read a few rows at a time.

Format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a big-endian header, two zero bytes,
a type byte (``0x08``: unsigned byte), the number of dimensions, then one ``uint32`` per
dimension; the payload follows in row-major order. Files may be gzipped (``.gz``).

``read_rows`` reads only some rows (flmem.rows): a plain file is memory-mapped window by
window, a ``.gz`` one decompressed in one pass.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flmem.rows import mapped_rows, streamed_rows

UBYTE = 0x08


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


def read_rows(header: IdxHeader, rows) -> np.ndarray:
    """Rows ``rows`` (indices [R] into the first dimension, any order) as ``uint8`` ``[R, *dims[1:]]``.

    Holds the result plus about ``flmem.rows.WINDOW_BYTES``. A plain file is mapped window by window
    (its size was checked with its header); a gzipped one is decompressed in one pass to its end, so
    a truncated or over-long one raises IdxFormatError even when the wanted rows come first.
    """
    row_shape = header.dims[1:]
    try:
        if header.path.suffix != ".gz":
            return mapped_rows(header.path, header.offset, header.count, row_shape, rows)
        with gzip.open(header.path, "rb") as fh:
            fh.read(header.offset)
            out = streamed_rows(fh.readinto, header.count, row_shape, rows, header.path, lambda held: (
                f"{header.path}: truncated: {header.offset + held} bytes uncompressed, but its header announces "
                f"{' x '.join(map(str, header.dims))} unsigned bytes ({header.offset + header.payload_bytes} "
                f"bytes with the header); replace it with the dataset's file"))
            if fh.read(1):
                raise IdxFormatError(f"{header.path}: longer than the {header.payload_bytes} payload bytes its "
                                     f"header announces; replace it with the dataset's file")
            return out
    except IdxFormatError:
        raise
    except (ValueError, IndexError, OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise IdxFormatError(str(exc) if str(header.path) in str(exc) else
                             f"{header.path}: unreadable ({type(exc).__name__}: {exc}); replace it with the "
                             f"dataset's file") from exc


def read_all(header: IdxHeader) -> np.ndarray:
    """The whole payload as ``uint8`` ``header.dims`` (for small files: labels)."""
    return read_rows(header, np.arange(header.count))
