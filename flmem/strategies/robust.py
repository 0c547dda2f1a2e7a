"""Coordinate-wise robust aggregation: FedMedian and the trimmed mean (Yin et al., 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", Section 3: coordinate-wise median and
coordinate-wise beta-trimmed mean). Both are unweighted: sample counts do not move a median.

Every coordinate of the next global model depends on that coordinate of every update, so the reduction needs
all N updates together. The original path keeps N whole models and reduces each tensor over them (as Flower's
FedMedian does). The optimized path (``combine = "coordinate"``) reduces *aligned chunks*: the server reads chunk
k of every client's stream, reduces it and writes chunk k of the new global model, so it holds N chunks, not N
models (the uploads advance together; gRPC flow control holds each client's stream meanwhile). Both paths call
the same :meth:`CoordinateWise.reduce` on the same values, so they agree bit for bit.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from flmem import serde
from flmem.strategies.base import Strategy, acc_dtype, cast


class CoordinateWise(Strategy):
    """A strategy whose next global model is, coordinate by coordinate, a function of the N updates' values.
    Subclasses override :meth:`reduce` only."""

    combine = "coordinate"

    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        """``stacked``: ``[N, n]`` values (rank order, float32 or float64) -> ``[n]`` in the same dtype."""
        raise NotImplementedError

    def end_round(self, round_idx: int, global_state: Mapping[str, torch.Tensor], streaming: bool) -> dict:
        if streaming:  # reduce_chunk has already written every chunk of the new global model
            return {}
        ordered = self.ordered_updates()
        with torch.no_grad():
            for name, target in global_state.items():
                stacked = torch.stack([u[name].reshape(-1).to(acc_dtype(target.dtype)) for u, _ in ordered])
                # copy_ through the logical shape: right for any strides (channels_last too)
                target.copy_(cast(self.reduce(stacked), target.dtype).view(target.shape))
                del stacked
        self.updates = {}  # the original path holds the N models until here
        return {}

    _staging: tuple[str, torch.Tensor] | None = None  # the non-contiguous global tensor being written

    def reduce_chunk(self, layout: serde.Layout, offset: int, datas: Sequence[bytes],
                     global_state: Mapping[str, torch.Tensor]) -> None:
        """Optimized path: reduce one payload chunk of every update (``datas``, rank order, the same
        ``offset``) and write the result into the same bytes of the global model. A global tensor that is not
        contiguous (``channels_last``) is written into a contiguous staging copy, copied in when its last chunk
        is reduced (chunks come in order: one staging tensor at a time)."""
        with torch.no_grad():
            for entry, t_start, c_start, nbytes in serde.segments(layout, offset, len(datas[0])):
                size = torch.empty((), dtype=entry.torch_dtype).element_size()
                count, dtype = nbytes // size, acc_dtype(entry.torch_dtype)
                stacked = torch.stack([serde.readonly_tensor(d, entry.torch_dtype, count, c_start).to(dtype)
                                       for d in datas])
                tensor = global_state[entry.name]
                staged = not tensor.is_contiguous()
                if staged and (self._staging is None or self._staging[0] != entry.name):
                    self._staging = (entry.name, torch.empty(tensor.numel(), dtype=tensor.dtype))
                flat = self._staging[1] if staged else tensor.view(-1)
                target = flat[t_start // size:t_start // size + count]
                target.copy_(cast(self.reduce(stacked), target.dtype))
                if staged and t_start + nbytes == entry.nbytes:  # the tensor's last chunk: copy it in
                    tensor.copy_(flat.view(tensor.shape))
                    self._staging = None


class FedMedian(CoordinateWise):
    """The coordinate-wise median (the mean of the two middle values for an even N, as numpy.median)."""

    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        ordered = stacked.sort(dim=0).values
        k = ordered.shape[0]
        if k % 2:
            return ordered[k // 2].clone()
        return (ordered[k // 2 - 1] + ordered[k // 2]) / 2


class TrimmedMean(CoordinateWise):
    """The coordinate-wise beta-trimmed mean: per coordinate, drop the ``int(beta * N)`` largest and smallest
    values and average the rest.

    Args:
        beta: fraction trimmed at each end, in [0, 0.5).
        **policy: see :class:`~flmem.strategies.base.Strategy`.
    Raises:
        ValueError: beta outside [0, 0.5); at aggregation, a round whose N leaves no value.
    """

    def __init__(self, *, beta: float = 0.2, **policy):
        super().__init__(**policy)
        if not 0.0 <= float(beta) < 0.5:
            raise ValueError(f"strategy.beta={beta}: must be in [0, 0.5)")
        self.beta = float(beta)

    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        k = stacked.shape[0]
        cut = int(self.beta * k)
        ordered = stacked.sort(dim=0).values
        kept = ordered[cut:k - cut]
        total = kept[0].clone()
        for row in kept[1:]:  # one row at a time: the same additions whatever the chunk's width
            total += row
        return total.div_(k - 2 * cut)
