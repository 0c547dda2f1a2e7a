"""State dicts to payload bytes and back, in two honest ways.

* ``torch`` format (the original path, what common FL code does): ``torch.save`` the
  whole state dict, wrap the bytes in one protobuf ``ModelBlob``, serialize that
  message, and cut the result into chunks. The receiver reassembles the bytes,
  parses the message and ``torch.load``s it with ``weights_only=True`` (network
  bytes are never unpickled with the full pickle machinery).
* ``raw`` format (the optimized path): a JSON tensor table (name, dtype, shape,
  byte offset; the safetensors idea) and the tensors' bytes laid end to end, each
  tensor starting on an 8-byte boundary. Chunks are cut straight from tensor
  storage, and a receiver can write them straight into its own tensors.

Chunk boundaries always fall on multiples of :data:`ALIGN`, so a chunk never
splits an element (elements are at most 8 bytes) and can be folded on its own.
"""
from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from flmem.proto import flmem_pb2

ALIGN = 8
#: protobuf refuses a serialized message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1

Chunk = tuple[int, bytes]  # (byte offset in the payload, data)


class PayloadTooLargeError(ValueError):
    """A model does not fit in one protobuf message (the original serde path)."""


class LayoutMismatchError(ValueError):
    """A received tensor table does not match the receiver's model."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    shape: tuple[int, ...]
    offset: int  # bytes from the payload start
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def numel(self) -> int:
        return self.nbytes // torch.empty((), dtype=self.torch_dtype).element_size()


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a state dict lies in a ``raw`` payload."""

    entries: tuple[TensorEntry, ...]
    total_bytes: int

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor]) -> "Layout":
        entries, offset = [], 0
        for name, t in state_dict.items():
            nbytes = t.numel() * t.element_size()
            entries.append(TensorEntry(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, nbytes))
            offset += -(-nbytes // ALIGN) * ALIGN
        return cls(tuple(entries), offset)

    def to_json(self) -> list:
        return [[e.name, e.dtype, list(e.shape), e.offset, e.nbytes] for e in self.entries]

    @classmethod
    def from_json(cls, table: list, total_bytes: int) -> "Layout":
        return cls(tuple(TensorEntry(n, d, tuple(s), o, b) for n, d, s, o, b in table), total_bytes)


def model_bytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """M: the sum of numel * element_size over the state dict, in bytes."""
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (a 0-d tensor is viewed as 1-d).

    Raises:
        ValueError: ``t`` is not contiguous (e.g. ``channels_last``): a flat view of it would be a copy, and bytes
            written there would never reach the tensor.
    """
    if not t.is_contiguous():
        raise ValueError(f"a {tuple(t.shape)} tensor with strides {t.stride()} is not contiguous: its bytes cannot be "
                         "viewed in place (write through a contiguous copy, then copy_ it back)")
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


# ---------------------------------------------------------------- headers
def make_header(fmt: str, total_bytes: int, layout: Layout | None = None) -> dict:
    header = {"format": fmt, "total_bytes": total_bytes}
    if layout is not None:
        header["tensors"] = layout.to_json()
    return header


def header_layout(header: dict) -> Layout:
    if header.get("format") != "raw":
        raise ValueError(f"payload format {header.get('format')!r} has no tensor table")
    try:
        layout = Layout.from_json(header["tensors"], header["total_bytes"])
        # The table must be the one this encoder writes: consecutive, aligned, sizes from dtype and shape.
        offset = 0
        for e in layout.entries:
            size = math.prod(e.shape) * torch.empty((), dtype=e.torch_dtype).element_size()
            if e.offset != offset or e.nbytes != size:
                raise LayoutMismatchError(f"tensor {e.name!r}: the table puts {e.nbytes} bytes at offset {e.offset}; "
                                          f"its dtype {e.dtype} and shape {list(e.shape)} make {size} bytes at "
                                          f"{offset}; send it as flmem's encoder lays it out")
            offset += -(-e.nbytes // ALIGN) * ALIGN
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, LayoutMismatchError):
            raise
        raise LayoutMismatchError(f"malformed tensor table: {type(exc).__name__}: {exc}") from None
    if offset != layout.total_bytes:
        raise LayoutMismatchError(f"the header claims {layout.total_bytes} payload bytes; its tensor table makes "
                                  f"{offset}")
    return layout


# ---------------------------------------------------------------- encoding
def encode_torch(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Original path: ``torch.save`` -> one ``ModelBlob`` protobuf -> its serialized bytes.

    Raises:
        PayloadTooLargeError: the serialized state dict reaches protobuf's 2 GiB message limit.
    """
    buffer = io.BytesIO()
    torch.save(dict(state_dict), buffer)
    payload = buffer.getvalue()
    if len(payload) >= PROTOBUF_LIMIT:
        raise PayloadTooLargeError(
            f"the serialized model is {len(payload) / 2**30:.2f} GiB, but the original serde path puts it in one "
            "protobuf message, which is limited to 2 GiB; use the raw format instead: optimization.serde=true "
            "(or optimize=true)")
    return flmem_pb2.ModelBlob(payload=payload).SerializeToString()


def chunk_bytes(blob: bytes, chunk_size: int) -> Iterator[Chunk]:
    """Cut a byte string into ``chunk_size`` slices (each slice is a copy, as ``bytes`` slicing is)."""
    for offset in range(0, len(blob), chunk_size):
        yield offset, blob[offset:offset + chunk_size]


def iter_raw_chunks(state_dict: Mapping[str, torch.Tensor], layout: Layout, chunk_size: int) -> Iterator[Chunk]:
    """Optimized path: chunks cut straight from tensor storage, never a whole-model buffer.

    Only one chunk (``chunk_size`` bytes, rounded down to a multiple of 8) exists at a time;
    a non-contiguous tensor is made contiguous on its own first.
    """
    chunk_size -= chunk_size % ALIGN
    pieces: list = []
    filled, chunk_start = 0, 0
    for entry in layout.entries:
        tensor = state_dict[entry.name]
        view = byte_view(tensor if tensor.is_contiguous() else tensor.contiguous())
        padded = -(-entry.nbytes // ALIGN) * ALIGN
        pos = 0
        while pos < padded:
            take = min(chunk_size - filled, padded - pos)
            real = max(0, min(take, entry.nbytes - pos))
            if real:
                pieces.append(view[pos:pos + real])
            if take > real:
                pieces.append(bytes(take - real))  # alignment padding
            filled += take
            pos += take
            if filled == chunk_size:
                yield chunk_start, b"".join(pieces)
                chunk_start += filled
                pieces, filled = [], 0
    if filled:
        yield chunk_start, b"".join(pieces)


# ---------------------------------------------------------------- decoding
def decode_torch(payload) -> dict[str, torch.Tensor]:
    """Parse a ``ModelBlob`` payload and load its state dict with ``weights_only=True``."""
    blob = flmem_pb2.ModelBlob.FromString(bytes(payload) if not isinstance(payload, bytes) else payload)
    return torch.load(io.BytesIO(blob.payload), weights_only=True, map_location="cpu")


def readonly_tensor(data: bytes, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    """A 1-d tensor view of immutable ``data``, never written to (torch warns about that case)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype, count=count, offset=offset)


def decode_raw(payload, layout: Layout) -> dict[str, torch.Tensor]:
    """Tensors over a ``raw`` payload: views of a ``bytearray`` (no copy), copies of immutable ``bytes``."""
    writable = isinstance(payload, bytearray)
    buffer = payload if writable else bytearray(payload)
    out = {}
    for e in layout.entries:
        flat = torch.frombuffer(buffer, dtype=e.torch_dtype, count=e.numel, offset=e.offset) if e.numel else \
            torch.empty(0, dtype=e.torch_dtype)
        out[e.name] = flat.view(e.shape)
    return out



def segments(layout: Layout, offset: int, length: int) -> Iterator[tuple[TensorEntry, int, int, int]]:
    """The tensor pieces a chunk covers: (entry, byte start in tensor, byte start in chunk, bytes)."""
    end = offset + length
    for e in layout.entries:  # tensors are few (hundreds); a linear scan costs nothing next to the copy
        lo, hi = max(offset, e.offset), min(end, e.offset + e.nbytes)
        if lo < hi:
            yield e, lo - e.offset, lo - offset, hi - lo


def loads_header(raw: bytes) -> dict:
    """Parse a model header: a JSON object with ``format`` (``raw`` | ``torch``) and an integer ``total_bytes``.

    Raises:
        ValueError: anything else (bad UTF-8 or JSON, nesting too deep, other types), quoting its start.
    """
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"the model header is not JSON ({type(exc).__name__}: {str(exc)[:100]}): "
                         f"{bytes(raw[:100])!r}") from None
    if not isinstance(header, dict) or header.get("format") not in ("torch", "raw") \
            or type(header.get("total_bytes")) is not int:
        raise ValueError(f"malformed model header (needs format raw|torch and an integer total_bytes): "
                         f"{bytes(raw[:200])!r}")
    return header


def dumps_header(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()
