"""CIFAR-10's python batch files read without loading their images: labels first, then only some rows.

A batch file (https://www.cs.toronto.edu/~kriz/cifar.html) is a pickled dict whose ``data`` is a
numpy ``uint8`` array ``[N, 3072]`` (CHW row-major) and ``labels`` a list of N ints. ``open_batch``
unpickles it with Python's own unpickler, restricted to the few globals such a file names, and
leaves every large string where it lies in the file: the array comes back as a ``LazyRows`` that
knows where its bytes are. Its rows are then read through flmem.rows:

* the published files (written by Python 2) hold the array's bytes raw: mapped window by window;
* files written by Python 3 with pickle protocol 2 hold them latin-1-decoded in a UTF-8 string
  (``_codecs.encode(s, "latin1")``): decoded in one pass, a window at a time.
"""
from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flmem.rows import WINDOW_BYTES, mapped_rows, streamed_rows

LAZY_MIN_BYTES = 1 << 16  # strings at least this long stay in the file


class CifarFormatError(ValueError):
    """A CIFAR-10 batch file that is not what torchvision's python layout holds."""


@dataclass(frozen=True)
class _Payload:
    offset: int  # where the string's bytes start in the file
    length: int  # bytes in the file
    encoding: str  # "raw": the bytes themselves; "latin1-in-utf8": UTF-8 of their latin-1 decoding


class LazyRows:
    """A pickled numpy array left in its file: ``shape``, ``dtype``, and ``rows()`` to read some rows.

    An array smaller than ``LAZY_MIN_BYTES`` is simply held.
    """

    def __init__(self, path: Path):
        self.path, self.shape, self.dtype, self.payload, self.array = path, None, None, None, None

    def __setstate__(self, state):  # numpy's ndarray state: (version, shape, dtype, fortran, rawdata)
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[4], (_Payload, bytes, str))):
            raise CifarFormatError(f"{self.path}: an array whose state is not numpy's; not a CIFAR-10 batch file")
        _, self.shape, self.dtype, fortran, raw = state
        self.shape = tuple(self.shape)
        expected = int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize
        length = raw.length if isinstance(raw, _Payload) else len(raw)
        if fortran or np.dtype(self.dtype) != np.uint8 or len(self.shape) != 2 or (
                not isinstance(raw, _Payload) or raw.encoding == "raw") and length != expected:
            raise CifarFormatError(f"{self.path}: data is {self.dtype} {self.shape} ({length} bytes); "
                                   f"expected uint8 [N, 3072] in row-major order")
        if isinstance(raw, _Payload):
            if raw.encoding == "utf8":
                raise CifarFormatError(f"{self.path}: data held as text; not a CIFAR-10 batch file")
            self.payload = raw
        else:
            data = raw.encode("latin1") if isinstance(raw, str) else raw
            self.array = np.frombuffer(data, dtype=np.uint8).reshape(self.shape)

    def whole(self) -> np.ndarray:
        """The whole array, ``uint8`` ``shape``, read into memory in one piece (as ``pickle.load`` would hold it).

        Raises CifarFormatError when the data string is shorter or longer than ``shape`` says.
        """
        if self.array is not None:
            return self.array
        if self.payload.encoding == "raw":  # open_batch checked that the string lies inside the file
            with open(self.path, "rb") as fh:
                fh.seek(self.payload.offset)
                return np.fromfile(fh, dtype=np.uint8, count=self.payload.length).reshape(self.shape)
        return self.rows(np.arange(self.shape[0]))

    def rows(self, rows) -> np.ndarray:
        """Rows ``rows`` (indices [R], any order) as ``uint8`` ``[R, shape[1]]``; holds about one window more.

        Raises CifarFormatError when the data string is shorter or longer than ``shape`` says.
        """
        count, row_shape = self.shape[0], tuple(self.shape[1:])
        if self.array is not None:
            return self.array[np.asarray(rows, dtype=np.int64)]
        if self.payload.encoding == "raw":
            return mapped_rows(self.path, self.payload.offset, count, row_shape, rows)
        size = count * int(np.prod(row_shape))
        with open(self.path, "rb") as fh:
            fh.seek(self.payload.offset)
            readinto = _latin1_utf8_reader(fh, self.payload.length)
            try:
                out = streamed_rows(readinto, count, row_shape, rows, self.path,
                                    lambda held: f"{self.path}: its data string ends after {held} of {size} bytes")
                longer = readinto(memoryview(bytearray(1)))
            except (ValueError, UnicodeError) as exc:
                raise CifarFormatError(f"{exc}; not a CIFAR-10 batch file" if str(self.path) in str(exc) else
                                       f"{self.path}: unreadable data string ({exc})") from exc
        if longer:
            raise CifarFormatError(f"{self.path}: its data string is longer than {size} bytes ({self.shape})")
        return out


def _latin1_utf8_reader(fh, length: int):
    """``readinto`` over the latin-1 bytes whose UTF-8 text is the next ``length`` bytes of ``fh``."""
    decoder, left, pending = codecs.getincrementaldecoder("utf-8")(), length, b""

    def readinto(view: memoryview) -> int:
        nonlocal left, pending
        while not pending and left:
            block = fh.read(min(left, WINDOW_BYTES // 4))  # decoding holds a few copies of a block
            if not block:
                left = 0
                break
            left -= len(block)
            pending = decoder.decode(block, final=not left).encode("latin1")
        n = min(len(view), len(pending))
        view[:n] = pending[:n]
        pending = pending[n:]
        return n

    return readinto


def _encode(text, encoding):  # Python 3's protocol-2 pickling of bytes: codecs.encode(str, "latin1")
    if encoding != "latin1" or not isinstance(text, (str, _Payload)):
        raise CifarFormatError(f"encodes a string with {encoding!r}, which a CIFAR-10 batch file does not")
    return _Payload(text.offset, text.length, "latin1-in-utf8") if isinstance(text, _Payload) else text.encode("latin1")


_NDARRAY = object()  # stands for numpy.ndarray as _reconstruct's argument: nothing may call it


class _BatchUnpickler(pickle._Unpickler):  # the Python one: its opcodes can be replaced one by one
    dispatch = dict(pickle._Unpickler.dispatch)
    GLOBALS = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _encode}

    def __init__(self, fh, path: Path):
        super().__init__(fh, encoding="latin1")  # as torchvision reads them: Python 2 strings as latin-1
        self.fh, self.path, self.size = fh, path, path.stat().st_size

    def find_class(self, module, name):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return lambda cls, shape, typecode: LazyRows(self.path)  # numpy's state follows, in BUILD
        found = self.GLOBALS.get((module, name))
        if found is None:
            raise CifarFormatError(f"{self.path}: names {module}.{name}, which a CIFAR-10 batch file does not; "
                                   f"refused (replace the file with the dataset's)")
        return found


def _lazy_opcode(size_bytes: int, signed: bool, encoding: str, default):
    """A string opcode that leaves a string of LAZY_MIN_BYTES or more in the file, as a _Payload."""
    def load(self):
        if self._unframer.current_frame is not None:  # protocol 4 frames are read into memory anyway
            return default(self)
        start = self.fh.tell()
        n = int.from_bytes(self.read(size_bytes), "little", signed=signed)
        if n < LAZY_MIN_BYTES:
            self.fh.seek(start)
            return default(self)
        if start + size_bytes + n > self.size:
            raise CifarFormatError(f"{self.path}: truncated: a {n}-byte string at byte {start + size_bytes} runs "
                                   f"past the end of the file ({self.size} bytes)")
        self.fh.seek(n, 1)
        self.append(_Payload(start + size_bytes, n, encoding))
    return load


for _code, (_size, _signed, _encoding) in {pickle.BINSTRING: (4, True, "raw"), pickle.BINBYTES: (4, False, "raw"),
                                           pickle.BINBYTES8: (8, False, "raw"),
                                           pickle.BINUNICODE: (4, False, "utf8"),
                                           pickle.BINUNICODE8: (8, False, "utf8")}.items():
    _BatchUnpickler.dispatch[_code[0]] = _lazy_opcode(_size, _signed, _encoding,
                                                      pickle._Unpickler.dispatch[_code[0]])


def open_batch(path: Path) -> dict:
    """A batch file's dict with ``data`` as a LazyRows (its images still in the file).

    Raises CifarFormatError naming the file when it is not a CIFAR-10 batch (another global, a
    truncated string, data not ``uint8`` [N, 3072] or not matching ``labels``).
    """
    with open(path, "rb") as fh:
        try:
            entry = _BatchUnpickler(fh, path).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError) as exc:
            if isinstance(exc, CifarFormatError):
                if str(path) in str(exc):
                    raise
                raise CifarFormatError(f"{path}: {exc}; refused (replace the file with the dataset's)") from exc
            raise CifarFormatError(f"{path}: not a CIFAR-10 batch file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(entry, dict) or not isinstance(entry.get("data"), LazyRows) or "labels" not in entry:
        raise CifarFormatError(f"{path}: not a CIFAR-10 batch file (expected a dict with data and labels)")
    if entry["data"].shape[1] != 3072:
        raise CifarFormatError(f"{path}: rows of {entry['data'].shape[1]} bytes; CIFAR-10 images are 3x32x32 = 3072")
    if entry["data"].shape[0] != len(entry["labels"]):
        raise CifarFormatError(f"{path}: {entry['data'].shape[0]} images but {len(entry['labels'])} labels")
    return entry


def read_batch(path: Path) -> tuple[np.ndarray, list]:
    """A batch file read whole, as torchvision's reader holds it: ``data`` ``uint8`` ``[N, 3072]`` and
    its N labels, through the same restricted unpickler as :func:`open_batch` (no other code runs).

    Raises CifarFormatError naming the file, as :func:`open_batch`.
    """
    entry = open_batch(path)
    return entry["data"].whole(), entry["labels"]
