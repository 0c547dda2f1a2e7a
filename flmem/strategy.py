"""FedAvg: the weighted average of client models (McMahan et al., 2017, "Communication-Efficient
Learning of Deep Networks from Decentralized Data", Algorithm 1): w = sum_k (n_k / n) * w_k,
where n_k is client k's number of local training samples and n = sum_k n_k.

Two implementations that give the same numbers:

* :func:`aggregate` (original): takes every client's whole state dict at once, as common FL
  servers do after keeping all N client models until the round ends.
* :class:`StreamingFedAvg` (optimized): one running weighted sum, folded chunk by chunk as
  updates arrive, then divided by n into the global model in place. Its memory does not
  depend on the number of clients.

Floating tensors are averaged in their own precision (float32 for float16/bfloat16);
integer tensors (e.g. BatchNorm's ``num_batches_tracked``) in float64, then rounded. Both
implementations round the same way (product, then sum, then one division), so they agree
bit for bit when updates are added in the same order (always, for two clients); otherwise
they differ by float rounding only.
"""
from __future__ import annotations

import threading
from typing import Mapping, Sequence

import torch

from flmem import serde


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_floating_point:
        return torch.float64 if dtype == torch.float64 else torch.float32
    return torch.float64


def _cast(mean: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return mean.to(dtype) if dtype.is_floating_point else mean.round().to(dtype)


def aggregate(updates: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """FedAvg over whole client state dicts.

    Args:
        updates: ``(state_dict, weight)`` per client; weight is n_k (or 1 for an unweighted mean).
    Returns:
        A new state dict with each tensor's dtype and shape.
    Raises:
        ValueError: no updates, or weights that do not sum to a positive number.
    """
    if not updates:
        raise ValueError("FedAvg needs at least one client update")
    total = float(sum(w for _, w in updates))
    if total <= 0:
        raise ValueError(f"FedAvg weights sum to {total}; they must be positive")
    averaged = {}
    for name, ref in updates[0][0].items():
        acc = torch.zeros(ref.shape, dtype=_acc_dtype(ref.dtype))
        for state, weight in updates:
            acc += state[name].to(acc.dtype) * float(weight)
        averaged[name] = _cast(acc / total, ref.dtype)
    return averaged


class StreamingFedAvg:
    """FedAvg as a running sum: memory is one accumulator (about 1 M for a float32 model), which
    exists only from a round's first update to its aggregation.

    Thread-safe: gRPC handler threads of different clients fold concurrently.

    Args:
        template: a state dict with the global model's names, dtypes and shapes.
    """

    def __init__(self, template: Mapping[str, torch.Tensor]):
        self.layout = serde.Layout.of(template)
        self._spec = {name: (tuple(t.shape), _acc_dtype(t.dtype)) for name, t in template.items()}
        self._acc: dict[str, torch.Tensor] | None = None  # allocated by the round's first fold
        self._flat: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.total_weight = 0.0
        self.num_updates = 0

    def _accumulators(self) -> dict[str, torch.Tensor]:
        if self._acc is None:
            self._acc = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in self._spec.items()}
            self._flat = {name: acc.view(-1) for name, acc in self._acc.items()}
        return self._acc

    def check_layout(self, layout: serde.Layout) -> None:
        self.layout.check_matches(layout)

    def fold_chunk(self, layout: serde.Layout, offset: int, data: bytes, weight: float) -> None:
        """Add ``weight`` times the tensor elements inside one ``raw`` payload chunk."""
        with self._lock:
            self._accumulators()
            for entry, t_start, c_start, nbytes in serde.segments(layout, offset, len(data)):
                size = torch.empty((), dtype=entry.torch_dtype).element_size()
                values = serde.readonly_tensor(data, entry.torch_dtype, nbytes // size, c_start)
                acc = self._flat[entry.name][t_start // size:(t_start + nbytes) // size]
                acc.add_(values.to(acc.dtype) * float(weight))  # the same roundings as aggregate()

    def fold_state_dict(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Add ``weight`` times a whole client state dict, and count it as one update."""
        with self._lock:
            for name, acc in self._accumulators().items():
                acc.add_(state[name].to(acc.dtype) * float(weight))
        self.count_update(weight)

    def count_update(self, weight: float) -> None:
        """Record that one client update (of FedAvg weight ``weight``) has been folded completely."""
        with self._lock:
            self.total_weight += float(weight)
            self.num_updates += 1

    def finalize_into(self, state: Mapping[str, torch.Tensor]) -> None:
        """Write the average into ``state`` (the global model's tensors) and reset for the next round.

        Raises:
            ValueError: nothing was folded since the last reset.
        """
        with self._lock:
            if self.total_weight <= 0 or self._acc is None:
                raise ValueError("no client update was folded in this round")
            with torch.no_grad():
                for name, acc in self._acc.items():
                    acc.div_(self.total_weight)
                    target = state[name]
                    target.copy_(acc if target.dtype.is_floating_point else acc.round_())
            # The sum is dead until the next round's first update: free it, so evaluation and serving
            # the global model run next to one model copy, not two.
            self._acc, self._flat = None, {}
            self.total_weight, self.num_updates = 0.0, 0
