"""Some rows of a ``uint8`` payload in a file, without holding the others.

A payload is ``count`` rows of ``row_shape`` bytes, in row-major order. Two ways to read it:

* ``mapped_rows``: the payload lies as raw bytes at ``offset``: it is memory-mapped one window
  (``WINDOW_BYTES``) at a time, and only windows holding a wanted row are mapped. memray counts
  a mapping as an allocation of its length, so one map over a 47 MB file would read as 47 MB.
* ``streamed_rows``: the payload comes out of a decoder (gzip...): one pass, a window at a time,
  keeping the wanted rows.

Both hold the result plus about one window.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

WINDOW_BYTES = 1 << 20  # bytes mapped or decoded at a time


def _plan(rows, count: int, row_bytes: int, path: Path):
    """The rows sorted (and the order that puts them back), and the rows per window."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= count):
        bad = int(rows.max()) if rows.max() >= count else int(rows.min())
        raise IndexError(f"{path}: row {bad} asked for, but the file holds rows 0..{count - 1}")
    order = np.argsort(rows, kind="stable")
    return rows[order], order, max(1, WINDOW_BYTES // max(1, row_bytes))


def mapped_rows(path: Path, offset: int, count: int, row_shape: tuple[int, ...], rows) -> np.ndarray:
    """Rows ``rows`` (indices [R], any order) as ``uint8`` ``[R, *row_shape]``, from raw bytes at ``offset``.

    The caller has checked that the file holds ``offset + count * prod(row_shape)`` bytes.
    """
    row_bytes = int(np.prod(row_shape, dtype=np.int64))
    wanted, order, per_window = _plan(rows, count, row_bytes, path)
    out = np.empty((len(wanted), *row_shape), dtype=np.uint8)
    with open(path, "rb") as fh:
        for start in range(0, count, per_window):
            stop = min(count, start + per_window)
            lo, hi = np.searchsorted(wanted, [start, stop])
            if lo == hi:
                continue  # no wanted row here: nothing is mapped
            mapped = np.memmap(fh, dtype=np.uint8, mode="r", offset=offset + start * row_bytes,
                               shape=(stop - start, *row_shape))
            out[order[lo:hi]] = mapped[wanted[lo:hi] - start]
            del mapped
    return out


def streamed_rows(readinto: Callable[[memoryview], int], count: int, row_shape: tuple[int, ...], rows,
                  path: Path, truncated: Callable[[int], str]) -> np.ndarray:
    """Rows ``rows`` as ``uint8`` ``[R, *row_shape]``, from ``count`` rows that ``readinto`` yields in order.

    ``readinto(view)`` fills a prefix of ``view`` and returns its length (0 at the end). Reads the
    whole payload. Raises ValueError with ``truncated(bytes_read)`` when it ends early.
    """
    row_bytes = int(np.prod(row_shape, dtype=np.int64))
    wanted, order, per_window = _plan(rows, count, row_bytes, path)
    out = np.empty((len(wanted), *row_shape), dtype=np.uint8)
    window = np.empty((per_window, *row_shape), dtype=np.uint8)
    for start in range(0, count, per_window):
        stop = min(count, start + per_window)
        view, got = memoryview(window[: stop - start]).cast("B"), 0
        while got < len(view):
            n = readinto(view[got:])
            if not n:
                raise ValueError(truncated(start * row_bytes + got))
            got += n
        lo, hi = np.searchsorted(wanted, [start, stop])
        out[order[lo:hi]] = window[wanted[lo:hi] - start]
    return out
