"""What arrives on the wire, checked against what the receiver already knows before any of it is used.

A model stream (the global model, or a client update) is a header, sent in pieces, then payload chunks. The
receiver knows its own model (its tensor table, :class:`~flmem.serde.Layout`) and the job's chunk size, so every
value of the stream has exactly one acceptable value or a bound:

* the header's length is capped before it is read (:func:`header_cap`), then it must parse as JSON;
* the payload format is the receiver's own (``optimization.serde``: ``raw`` or ``torch``);
* ``raw``: the tensor table must *equal* the receiver's (names, dtypes, shapes, offsets, sizes, in order) and
  ``total_bytes`` its total; ``torch``: ``total_bytes`` is bounded by what the model can serialize to;
* chunk i must be ``[i * chunk, i * chunk + min(chunk, rest))``, the cut every sender makes; the first byte past
  the end is refused as soon as its chunk arrives (:func:`checked_chunks`);
* under ``server.non_finite=reject``, a NaN or infinity in a floating tensor is refused: per chunk before it is
  combined (``raw``), or on the whole decoded update (``torch``, :func:`check_update`).

Every refusal is a ``ValueError`` (:class:`~flmem.serde.LayoutMismatchError` for a table) naming the value.
"""
from __future__ import annotations

import json
import math
from typing import Iterable, Iterator, Mapping

import torch

from flmem import serde
from flmem.serde import Chunk

#: room above twice the receiver's own header (JSON spacing, longer integers) in :func:`header_cap`
HEADER_SLACK = 4096
NON_FINITE = ("reject", "accept")


def header_cap(layout: serde.Layout) -> int:
    """The longest header (bytes) a receiver of a model with ``layout`` reads: twice the length of the ``raw``
    header it would itself write for that model (the longer of the two formats' headers), plus
    :data:`HEADER_SLACK` bytes. A longer header is refused before any of it is read past its first piece."""
    own = serde.dumps_header(serde.make_header("raw", layout.total_bytes, layout))
    return 2 * len(own) + HEADER_SLACK


def header_pieces(header: bytes, piece_bytes: int) -> list[bytes]:
    """``header`` cut into pieces of at most ``piece_bytes`` bytes (at least one piece, maybe empty)."""
    return [header[i:i + piece_bytes] for i in range(0, len(header), piece_bytes)] or [b""]


class Incoming:
    """One model stream as it arrives: ``(header_piece, offset, data)`` triples, header pieces first.

    Args:
        declared: the header's total length announced by the first message (0: the first piece is all of it).
        messages: the stream's triples, the first one included; read lazily, once.
    Attributes:
        received: bytes read so far (header and payload), for error messages.
    """

    def __init__(self, declared: int, messages: Iterable[tuple[bytes, int, bytes]]):
        self.declared = declared
        self.messages = iter(messages)
        self.received = 0
        self._pending: tuple[int, bytes] | None = None  # a payload chunk read with the header's last piece

    @classmethod
    def of(cls, header: dict, chunks: Iterable[Chunk]) -> "Incoming":
        """An in-process stream: ``header`` in one piece, then ``chunks``."""
        def triples():
            yield serde.dumps_header(header), 0, b""
            for offset, data in chunks:
                yield b"", offset, data
        return cls(0, triples())

    def header(self, cap: int) -> dict:
        """Read the header's pieces and parse it.

        Raises:
            ValueError: no message at all, a header longer than ``cap`` bytes (refused before its pieces are read),
                pieces that do not add up to the announced length, payload before the header is complete, or a
                header that is not flmem's JSON.
        """
        first = next(self.messages, None)
        if first is None:
            raise ValueError("the stream ended before its first message (an empty stream)")
        piece, offset, data = first
        total = self.declared or len(piece)
        if not 0 <= total <= cap or len(piece) > total:
            raise ValueError(f"the header is {max(total, len(piece))} bytes long; this receiver reads at most {cap} "
                             "(twice its own model's header plus 4 KiB): it describes another model")
        pieces, got = [piece], len(piece)
        self.received += len(piece) + len(data)
        while got < total:
            if data:
                raise ValueError(f"payload data arrived after {got} of the header's {total} bytes")
            nxt = next(self.messages, None)
            if nxt is None:
                raise ValueError(f"the stream ended after {got} of the header's {total} bytes")
            piece, offset, data = nxt
            self.received += len(piece) + len(data)
            if not piece and not data:  # each message must advance the header: no endless empty messages
                raise ValueError(f"an empty message after {got} of the header's {total} bytes")
            if got + len(piece) > total:
                raise ValueError(f"the header's pieces exceed its announced {total} bytes")
            pieces.append(piece)
            got += len(piece)
        if data or offset:
            self._pending = (offset, data)
        if not total:
            raise ValueError("the stream has no header (an empty first message)")
        return serde.loads_header(b"".join(pieces))

    def chunks(self) -> Iterator[Chunk]:
        """The payload chunks, after :meth:`header`.

        Raises:
            ValueError: a header piece among the payload."""
        if self._pending is not None:
            yield self._pending
            self._pending = None
        for piece, offset, data in self.messages:
            self.received += len(piece) + len(data)
            if piece:
                raise ValueError(f"a header piece arrived among the payload chunks (at offset {offset})")
            yield offset, data


def checked_chunks(chunks: Iterable[Chunk], total: int, chunk: int, layout: serde.Layout | None = None,
                   non_finite: str = "accept") -> Iterator[Chunk]:
    """``chunks`` passed through one by one, each refused unless it is the next cut of a ``total``-byte payload
    into ``chunk``-byte pieces; with a ``raw`` ``layout`` and ``non_finite="reject"``, also unless its floating
    values are finite. A chunk past the end is refused when it arrives (nothing of it is kept; the last chunk is
    handed on only after the end of the stream is seen, so none of it is used either), a short stream when it ends.

    Raises:
        ValueError: naming the chunk, its offset and length, and the cut expected.
    """
    position = 0
    chunks = iter(chunks)
    for i, (offset, data) in enumerate(chunks):
        length = len(data)
        want = min(chunk, total - position)
        if position >= total:
            raise ValueError(f"chunk {i} [{offset}, {offset + length}) lies past the end of the {total}-byte payload")
        if offset != position or length != want:
            raise ValueError(f"chunk {i} is [{offset}, {offset + length}); the cut of a {total}-byte payload into "
                             f"{chunk}-byte chunks puts it at [{position}, {position + want}): chunks must arrive "
                             "in order, and server and clients must use the same transport.chunk_size")
        if layout is not None and non_finite == "reject":
            check_finite_chunk(layout, offset, data)
        position += length
        if position == total:  # the last chunk is handed on only once the stream has ended: a byte too many
            extra = next(chunks, None)  # is refused before any of the last chunk is used
            if extra is not None:
                raise ValueError(f"chunk {i + 1} [{extra[0]}, {extra[0] + len(extra[1])}) lies past the end of the "
                                 f"{total}-byte payload (a byte too many)")
        yield offset, data
    if position != total:
        raise ValueError(f"stream ended after {position} of {total} payload bytes")


def check_finite_chunk(layout: serde.Layout, offset: int, data: bytes) -> None:
    """Raise ValueError if a floating tensor's values inside one ``raw`` chunk are not all finite."""
    for entry, t_start, c_start, nbytes in serde.segments(layout, offset, len(data)):
        dtype = entry.torch_dtype
        if not dtype.is_floating_point:
            continue
        size = torch.empty((), dtype=dtype).element_size()
        values = serde.readonly_tensor(data, dtype, nbytes // size, c_start)
        if not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).nonzero()[0, 0]) + t_start // size
            raise ValueError(f"tensor {entry.name!r} holds a non-finite value ({float(values[bad - t_start // size])}"
                             f" at flat index {bad}); server.non_finite=reject refuses it (accept: let it in)")


def check_update(update, layout: serde.Layout, non_finite: str = "accept") -> None:
    """Refuse a decoded ``torch``-format update unless it is a state dict with exactly the tensors of ``layout``
    (names, dtypes, shapes) and, under ``non_finite="reject"``, finite floating values.

    Raises:
        serde.LayoutMismatchError: naming the first missing, extra or different tensor.
        ValueError: a non-finite value.
    """
    if not isinstance(update, Mapping) or not all(isinstance(t, torch.Tensor) for t in update.values()):
        raise serde.LayoutMismatchError(f"the update is a {type(update).__name__}, not a state dict of tensors")
    expected = {e.name: e for e in layout.entries}
    missing = [name for name in expected if name not in update]
    extra = [name for name in update if name not in expected]
    if missing or extra:
        raise serde.LayoutMismatchError(f"the update's tensors differ from the global model's: missing "
                                        f"{missing[:5] or 'none'}, unknown {[str(x)[:80] for x in extra[:5]] or 'none'}")
    for name, e in expected.items():
        t = update[name]
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype != e.dtype or tuple(t.shape) != e.shape:
            raise serde.LayoutMismatchError(f"tensor {name!r}: received {dtype} {list(t.shape)}, the global model "
                                            f"has {e.dtype} {list(e.shape)}")
        if non_finite == "reject" and t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name!r} holds a non-finite value; server.non_finite=reject refuses it "
                             "(accept: let it in)")


def check_table(header: dict, layout: serde.Layout) -> serde.Layout:
    """The receiver's ``layout`` if the ``raw`` header's tensor table and ``total_bytes`` equal it exactly.

    Raises:
        serde.LayoutMismatchError: naming the first entry that differs (or a count or total that does).
    """
    table = header.get("tensors")
    if not isinstance(table, list):
        raise serde.LayoutMismatchError("the raw header has no tensor table (a 'tensors' list)")
    mine = layout.to_json()
    for i, (theirs, own) in enumerate(zip(table, mine)):
        if not _same(theirs, own):
            raise serde.LayoutMismatchError(
                f"tensor table entry {i} (tensor {own[0]!r}): received {json.dumps(theirs)[:200]}, the global model has "
                f"{json.dumps(own)} ([name, dtype, shape, offset, bytes]); server and clients must build the same "
                "model (same model, dataset and overrides)")
    if len(table) != len(mine):
        raise serde.LayoutMismatchError(f"the tensor table has {len(table)} entries, the global model {len(mine)}")
    total = header.get("total_bytes")
    if total != layout.total_bytes or isinstance(total, bool):
        raise serde.LayoutMismatchError(f"the header claims {total} payload bytes; the global model's raw payload "
                                        f"is {layout.total_bytes}")
    return layout


def _same(theirs, own) -> bool:
    """JSON values equal, with ints never standing in for bools or floats for ints (``1.0 != 1`` here)."""
    if type(theirs) is not type(own):
        return False
    if isinstance(own, list):
        return len(theirs) == len(own) and all(_same(a, b) for a, b in zip(theirs, own))
    return theirs == own and not (isinstance(own, float) and math.isnan(own))
