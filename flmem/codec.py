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

from flmem import serde
from flmem.serde import Chunk


class ModelCodec:
    """Encode and receive state dicts.

    Args:
        serde_optimized: ``raw`` format (tensor bytes outside any protobuf envelope) instead of
            ``torch.save`` inside one ``ModelBlob`` message.
        transport_optimized: receive into preallocated memory instead of ``bytes +=``.
        chunk_size: payload bytes per chunk (rounded down to a multiple of 8 for ``raw``).
        release: drop dead references and collect as soon as possible.
    """

    def __init__(self, serde_optimized: bool, transport_optimized: bool, chunk_size: int, release: bool = False):
        self.serde_optimized = serde_optimized
        self.transport_optimized = transport_optimized
        self.chunk_size = chunk_size
        self.release = release

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
                state_dict, layout, self.chunk_size)
        blob = serde.encode_torch(state_dict)
        return serde.make_header("torch", len(blob)), serde.chunk_bytes(blob, self.chunk_size)

    # ------------------------------------------------------------ receiving
    def assemble(self, header: dict, chunks: Iterable[Chunk]) -> bytes | bytearray:
        """The whole payload in memory: ``bytes +=`` (original) or a preallocated ``bytearray``."""
        total = header["total_bytes"]
        if self.transport_optimized:
            # Removes the quadratic re-copying of `bytes +=`: one buffer of the announced size.
            buffer = bytearray(total)
            view = memoryview(buffer)
            received = 0
            for offset, data in chunks:
                _check_bounds(offset, len(data), total)
                view[offset:offset + len(data)] = data
                received += len(data)
            _check_complete(received, total)
            return buffer
        payload = b""
        for _, data in chunks:
            payload += data
        if len(payload) != total:
            raise ValueError(f"stream ended after {len(payload)} of {total} payload bytes")
        return payload

    def receive(self, header: dict, chunks: Iterable[Chunk]) -> dict[str, torch.Tensor]:
        """A new state dict decoded from the stream."""
        payload = self.assemble(header, chunks)
        return serde.decode(header, payload)

    def receive_into(self, header: dict, chunks: Iterable[Chunk], state: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the tensors of ``state`` (e.g. ``model.state_dict()``) with the streamed model.

        Raises:
            serde.LayoutMismatchError: the stream holds another model.
        """
        if self.serde_optimized and self.transport_optimized and header["format"] == "raw":
            # Removes the received whole-model buffer: each chunk lands in the parameters' own storage.
            layout = serde.header_layout(header)
            layout.check_matches(serde.Layout.of(state))
            targets = {name: serde.byte_view(t) for name, t in state.items()}
            received = 0
            for offset, data in chunks:
                _check_bounds(offset, len(data), layout.total_bytes)
                for entry, t_start, c_start, n in serde.segments(layout, offset, len(data)):
                    targets[entry.name][t_start:t_start + n] = memoryview(data)[c_start:c_start + n]
                received += len(data)
            _check_complete(received, layout.total_bytes)
            return
        check_claimed_size(header, serde.model_bytes(state))
        received = self.receive(header, chunks)
        serde.Layout.of(state).check_matches(serde.Layout.of(received))
        with torch.no_grad():
            for name, tensor in state.items():
                tensor.copy_(received[name])
        if self.release:
            del received
            gc.collect()

    def fold(self, header: dict, chunks: Iterable[Chunk], aggregator, weight: float) -> None:
        """Add ``weight`` times the streamed update to ``aggregator`` (a :class:`~flmem.strategies.RunningSum`).

        Raises:
            serde.LayoutMismatchError: the update holds another model (raised before anything is added).
            ValueError: a chunk outside the payload, or a stream that ends early (chunks may have been added).
        """
        if self.serde_optimized and self.transport_optimized and header["format"] == "raw":
            # Removes the per-client model: every chunk is folded into the running sum and dropped.
            layout = serde.header_layout(header)
            aggregator.check_layout(layout)
            received = 0
            for offset, data in chunks:
                _check_bounds(offset, len(data), layout.total_bytes)
                aggregator.fold_chunk(layout, offset, data, weight)
                received += len(data)
            _check_complete(received, layout.total_bytes)  # a partial update must not count as one
            aggregator.count_update(weight)
            return
        check_claimed_size(header, aggregator.layout.total_bytes)
        update = self.receive(header, chunks)
        aggregator.check_layout(serde.Layout.of(update))  # before any tensor is added
        aggregator.fold_state_dict(update, weight)
        del update
        if self.release:
            gc.collect()


    def aligned_chunks(self, header: dict, chunks: Iterable[Chunk], layout: serde.Layout) -> Iterator[Chunk]:
        """The update as ``raw`` chunks cut at multiples of ``chunk_size`` (for the chunk-aligned reduction).

        A ``raw`` stream is passed through as it arrives (after its tensor table is checked against ``layout``);
        a ``torch`` stream is received whole first, so it holds one model per client in flight.
        Raises:
            serde.LayoutMismatchError: the update holds another model.
        """
        if self.serde_optimized and self.transport_optimized and header["format"] == "raw":
            theirs = serde.header_layout(header)
            layout.check_matches(theirs)
            if theirs != layout:  # chunk k is read with this server's table: it must be the same table
                raise serde.LayoutMismatchError("the update's tensor table orders or places its tensors differently "
                                                "from the global model's; send it as the server's encoder lays it out")
            return chunks
        check_claimed_size(header, layout.total_bytes)
        update = self.receive(header, chunks)
        layout.check_matches(serde.Layout.of(update))
        return serde.iter_raw_chunks(update, layout, self.chunk_size)


def check_claimed_size(header: dict, model_bytes: int) -> None:
    """Refuse a ``torch``-format stream that claims more bytes than a model of ``model_bytes`` can serialize to
    (twice that plus 1 MiB of pickle framing), before any buffer of the claimed size is allocated."""
    limit = 2 * model_bytes + 2**20
    if header["format"] == "torch" and not 0 <= header["total_bytes"] <= limit:
        raise ValueError(f"the stream claims {header['total_bytes']} payload bytes; a {model_bytes}-byte model "
                         f"serializes to at most {limit}")


def _check_complete(received: int, total: int) -> None:
    """Chunks are consecutive and never overlap (the sender cuts them in order), so a byte count suffices."""
    if received != total:
        raise ValueError(f"stream ended after {received} of {total} payload bytes")


def _check_bounds(offset: int, length: int, total: int) -> None:
    if offset < 0 or offset + length > total:
        raise ValueError(f"chunk [{offset}, {offset + length}) lies outside the {total}-byte payload")

