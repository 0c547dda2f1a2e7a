"""Moving a state dict through a chunk stream: the original and the optimized receive paths.

:class:`ModelCodec` picks, from two optimization flags, how a model becomes chunks
(``serde``) and how received chunks become tensors again (``transport``). It knows
nothing of gRPC: chunks are ``(offset, bytes)`` pairs, so the same code serves the
gRPC layer and the tests.
"""
from __future__ import annotations

import gc
from typing import Iterable, Iterator, Mapping

import torch

from flmem import serde, wire
from flmem.serde import Chunk


class ModelCodec:
    """Encode and receive state dicts; every received stream is checked against the receiver's model first
    (:mod:`flmem.wire`).

    Args:
        serde_optimized: ``raw`` format (tensor bytes outside any protobuf envelope) instead of
            ``torch.save`` inside one ``ModelBlob`` message. The format is the receiver's configuration: a
            stream in the other one is refused.
        transport_optimized: receive into preallocated memory instead of ``bytes +=``.
        chunk_size: payload bytes per chunk, rounded down to a multiple of 8 (:attr:`chunk`), for both formats.
        release: drop dead references and collect as soon as possible.
    """

    def __init__(self, serde_optimized: bool, transport_optimized: bool, chunk_size: int, release: bool = False):
        self.serde_optimized = serde_optimized
        self.transport_optimized = transport_optimized
        self.chunk_size = chunk_size
        self.release = release

    @property
    def format(self) -> str:
        """The payload format this codec sends and accepts: ``raw`` or ``torch``."""
        return "raw" if self.serde_optimized else "torch"

    @property
    def chunk(self) -> int:
        """Payload bytes per chunk as every sender cuts them (``chunk_size`` rounded down to a multiple of 8)."""
        return self.chunk_size - self.chunk_size % serde.ALIGN

    # ------------------------------------------------------------ sending
    def encode(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, Iterator[Chunk]]:
        """Header and chunk iterator for ``state_dict``.

        Raises:
            serde.PayloadTooLargeError: original serde path and a model of 2 GiB or more.
        """
        if self.serde_optimized:
            # Removes the serialized whole-model copies (torch.save buffer, protobuf message, its bytes):
            # chunks are cut from tensor storage one at a time.
            layout = serde.Layout.of(state_dict)
            return serde.make_header("raw", layout.total_bytes, layout), serde.iter_raw_chunks(
                state_dict, layout, self.chunk)
        blob = serde.encode_torch(state_dict)
        return serde.make_header("torch", len(blob)), serde.chunk_bytes(blob, self.chunk)

    # ------------------------------------------------------------ checking
    def check_header(self, header: dict, layout: serde.Layout | None) -> serde.Layout | None:
        """Refuse a header before anything is allocated for it: a payload format other than :attr:`format`;
        ``raw``: a tensor table or ``total_bytes`` other than ``layout``'s (the receiver's model); ``torch``: more
        bytes than ``layout``'s model serializes to. Returns the table to read a ``raw`` payload with.

        Raises:
            ValueError (serde.LayoutMismatchError for a table): naming the value and the fix.
        """
        if header["format"] != self.format:
            raise ValueError(f"the payload is in the {header['format']!r} format, but this process sends and accepts "
                             f"{self.format!r} (optimization.serde={str(self.serde_optimized).lower()}); set the same "
                             "optimization.serde (or optimize) on the server and every client")
        if self.format == "raw":
            return wire.check_table(header, layout) if layout is not None else serde.header_layout(header)
        if layout is not None:
            check_claimed_size(header, layout.total_bytes)
        return None

    def checked(self, header: dict, chunks: Iterable[Chunk], layout: serde.Layout | None,
                non_finite: str = "accept") -> Iterator[Chunk]:
        """``chunks`` checked one by one as they arrive (:func:`flmem.wire.checked_chunks`): cut at multiples of
        :attr:`chunk`, in order, nothing past ``total_bytes``; ``raw`` with ``non_finite="reject"``: finite."""
        raw = layout if header["format"] == "raw" else None
        return wire.checked_chunks(chunks, header["total_bytes"], self.chunk, raw, non_finite)

    # ------------------------------------------------------------ receiving
    def assemble(self, header: dict, chunks: Iterable[Chunk]) -> bytes | bytearray:
        """The whole payload in memory: ``bytes +=`` (original) or a preallocated ``bytearray``. ``chunks`` must be
        checked (:meth:`checked`: in order, inside the payload, complete); :meth:`receive` does."""
        if self.transport_optimized:
            # Removes the quadratic re-copying of `bytes +=`: one buffer of the announced size.
            buffer = bytearray(header["total_bytes"])
            view = memoryview(buffer)
            for offset, data in chunks:
                view[offset:offset + len(data)] = data
            return buffer
        payload = b""
        for _, data in chunks:
            payload += data
        return payload

    def receive(self, header: dict, chunks: Iterable[Chunk], layout: serde.Layout | None = None,
                non_finite: str = "accept") -> dict[str, torch.Tensor]:
        """A new state dict decoded from the stream, checked against ``layout`` (the receiver's model; None: only
        the stream's own consistency) and the ``non_finite`` policy (``reject`` | ``accept``).

        Raises:
            ValueError (serde.LayoutMismatchError for a table): see :meth:`check_header`, :meth:`checked` and
                :func:`flmem.wire.check_update`.
        """
        table = self.check_header(header, layout)
        payload = self.assemble(header, self.checked(header, chunks, table, non_finite))
        if header["format"] == "raw":
            return serde.decode_raw(payload, table)
        update = serde.decode_torch(payload)
        del payload
        if layout is not None:
            wire.check_update(update, layout, non_finite)
        return update

    def receive_into(self, header: dict, chunks: Iterable[Chunk], state: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the tensors of ``state`` (e.g. ``model.state_dict()``) with the streamed model; tensors that
        are not contiguous (e.g. ``channels_last``) are received through a staging copy, one tensor at a time.

        Raises:
            serde.LayoutMismatchError: the stream holds another model.
            ValueError: another payload format, or chunks not cut as :attr:`chunk` cuts them.
        """
        layout = serde.Layout.of(state)
        if self.serde_optimized and self.transport_optimized and header["format"] == "raw":
            # Removes the received whole-model buffer: each chunk lands in the parameters' own storage.
            self.check_header(header, layout)
            writer = _TensorWriter(state)
            for offset, data in self.checked(header, chunks, layout):
                for entry, t_start, c_start, n in serde.segments(layout, offset, len(data)):
                    writer.write(entry, t_start, memoryview(data)[c_start:c_start + n])
            return
        received = self.receive(header, chunks, layout)
        with torch.no_grad():
            for name, tensor in state.items():
                tensor.copy_(received[name])
        if self.release:
            del received
            gc.collect()

    def fold(self, header: dict, chunks: Iterable[Chunk], aggregator, weight: float,
             non_finite: str = "accept") -> None:
        """Add ``weight`` times the streamed update to ``aggregator`` (a :class:`~flmem.strategies.RunningSum`).

        Raises:
            serde.LayoutMismatchError: the update holds another model (raised before anything is added).
            ValueError: another format, a chunk not where the cut puts it, past the end, non-finite under
                ``non_finite="reject"`` (refused before it is added), or a stream that ends early (earlier chunks
                may have been added).
        """
        if self.serde_optimized and self.transport_optimized and header["format"] == "raw":
            # Removes the per-client model: every chunk is folded into the running sum and dropped.
            layout = self.check_header(header, aggregator.layout)
            for offset, data in self.checked(header, chunks, layout, non_finite):
                aggregator.fold_chunk(layout, offset, data, weight)
            aggregator.count_update(weight)  # only a complete update counts as one
            return
        update = self.receive(header, chunks, aggregator.layout, non_finite)
        aggregator.fold_state_dict(update, weight)
        del update
        if self.release:
            gc.collect()

    def aligned_chunks(self, header: dict, chunks: Iterable[Chunk], layout: serde.Layout,
                       non_finite: str = "accept") -> Iterator[Chunk]:
        """The update as ``raw`` chunks cut at multiples of :attr:`chunk` (for the chunk-aligned reduction).

        A ``raw`` stream is passed through as it arrives, each chunk checked (:meth:`checked`) before it is
        handed on; its tensor table is checked against ``layout`` at once. A ``torch`` stream is received whole
        and checked first, so it holds one model per client in flight.
        Raises:
            serde.LayoutMismatchError: the update holds another model.
            ValueError: see :meth:`fold`.
        """
        if self.serde_optimized and self.transport_optimized and header["format"] == "raw":
            self.check_header(header, layout)
            return self.checked(header, chunks, layout, non_finite)
        update = self.receive(header, chunks, layout, non_finite)
        return serde.iter_raw_chunks(update, layout, self.chunk)


class _TensorWriter:
    """Writes received bytes into a state dict's tensors: straight into contiguous ones, into a contiguous staging
    copy for the others (``channels_last``, transposed), copied in when its last byte has arrived (chunks arrive in
    order, so at most one staging tensor exists at a time)."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = state
        self.staging: tuple[str, torch.Tensor, memoryview] | None = None

    def write(self, entry: serde.TensorEntry, start: int, data: memoryview) -> None:
        tensor = self.state[entry.name]
        if tensor.is_contiguous():
            serde.byte_view(tensor)[start:start + len(data)] = data
            return
        if self.staging is None or self.staging[0] != entry.name:
            flat = torch.empty(tensor.shape, dtype=tensor.dtype)
            self.staging = (entry.name, flat, serde.byte_view(flat))
        name, flat, view = self.staging
        view[start:start + len(data)] = data
        if start + len(data) == entry.nbytes:
            with torch.no_grad():
                tensor.copy_(flat)
            self.staging = None


def check_claimed_size(header: dict, model_bytes: int) -> None:
    """Refuse a ``torch``-format stream that claims more bytes than a model of ``model_bytes`` can serialize to
    (twice that plus 1 MiB of pickle framing), before any buffer of the claimed size is allocated."""
    limit = 2 * model_bytes + 2**20
    if header["format"] == "torch" and not 0 <= header["total_bytes"] <= limit:
        raise ValueError(f"the stream claims {header['total_bytes']} payload bytes; a {model_bytes}-byte model "
                         f"serializes to at most {limit}")
