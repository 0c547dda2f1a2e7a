"""FedAvg (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data",
Algorithm 1): w = sum_k (n_k / n) * w_k, where n_k is client k's number of local training samples and
n = sum_k n_k; and FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks"), which
aggregates as FedAvg and adds a proximal term on the client.

The weighted mean, two ways that give the same numbers bit for bit:

* :func:`aggregate` (original): every client's whole state dict at once.
* :class:`RunningSum` (optimized, ``aggregate_inplace``): one running weighted sum folded chunk by chunk, then
  divided in place; its memory does not depend on the number of clients.

Both add the updates in rank order (the server folds them in that order), product first, then sum, then one
division; floating tensors in their own precision (float32 for float16/bfloat16), integers (e.g. BatchNorm's
``num_batches_tracked``) in float64, rounded at the end.

A client that fails after part of its update was added cannot be subtracted back bit for bit (float addition
does not invert), so the server discards the whole sum (:meth:`RunningSum.abandon`: zeroed in place, no copy is
kept) and asks the clients already added to send their updates again (:mod:`flmem.restart`); folding restarts
from zero in rank order, giving the floats of a round without that client.
"""
from __future__ import annotations

import threading
from typing import Mapping, Sequence

import torch

from flmem import serde
from flmem.strategies.base import Strategy, acc_dtype, cast


def aggregate(updates: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """The weighted mean of whole client state dicts, in :func:`~flmem.strategies.base.acc_dtype`.

    Args:
        updates: ``(state_dict, weight)`` per client, in rank order; weight is n_k (or 1 for a plain mean).
    Returns:
        A new dict of float32/float64 tensors with each tensor's shape.
    Raises:
        ValueError: no updates, or weights that do not sum to a positive number.
    """
    if not updates:
        raise ValueError("FedAvg needs at least one client update")
    total = float(sum(w for _, w in updates))
    if total <= 0:
        raise ValueError(f"FedAvg weights sum to {total}; they must be positive")
    mean = {}
    for name, ref in updates[0][0].items():
        acc = torch.zeros(ref.shape, dtype=acc_dtype(ref.dtype))
        for state, weight in updates:
            acc += state[name].to(acc.dtype) * float(weight)
        mean[name] = acc / total
    return mean


class RunningSum:
    """The weighted sum of client updates, folded as they stream in: one accumulator per tensor (about 1 M for a
    float32 model), allocated by the round's first fold. Thread-safe.

    Args:
        template: a state dict with the global model's names, dtypes and shapes.
    """

    def __init__(self, template: Mapping[str, torch.Tensor]):
        self.layout = serde.Layout.of(template)
        self._spec = {name: (tuple(t.shape), acc_dtype(t.dtype)) for name, t in template.items()}
        self._acc: dict[str, torch.Tensor] | None = None
        self._flat: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.total_weight = 0.0
        self.num_updates = 0
        self.folds = 0  # chunks or state dicts added so far, over the whole job
        self._turn = 0  # the update being added (see turn()); folds of an older turn are refused
        self._turn_folds = 0

    def _accumulators(self) -> dict[str, torch.Tensor]:
        if self._acc is None:
            self._acc = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in self._spec.items()}
            self._flat = {name: acc.view(-1) for name, acc in self._acc.items()}
        return self._acc

    def turn(self) -> "UpdateTurn":
        """Open the turn of the next update: what :meth:`~flmem.codec.ModelCodec.fold` adds through. Opening a
        turn closes the one before (its folds are refused from then on)."""
        with self._lock:
            self._turn += 1
            self._turn_folds = 0
            return UpdateTurn(self, self._turn)

    def abandon(self, turn: int) -> bool:
        """The update of ``turn`` will not complete (its client failed): its later folds are refused, and if part of
        it was added already, the whole sum is discarded (zeroed in place, weight 0: the round restarts folding from
        nothing). Returns whether the sum was discarded; False for a turn already closed."""
        with self._lock:
            if turn != self._turn:
                return False
            self._turn += 1
            if not self._turn_folds:
                return False
            self._reset()
            return True

    def reset(self) -> None:
        """Empty the sum, keeping its memory (the next fold adds into zeros, as the round's first one does)."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        for acc in (self._acc or {}).values():
            acc.zero_()
        self.total_weight, self.num_updates = 0.0, 0

    def _enter(self, turn: int | None) -> None:
        """Count one fold of ``turn`` (None: no turn check); lock held."""
        if turn is not None:
            if turn != self._turn:
                raise SumDiscardedError("this update's turn at the running sum was closed (its client failed and the "
                                        "round's sum was discarded or moved on): nothing more of it is added")
            self._turn_folds += 1
        self.folds += 1

    def fold_chunk(self, layout: serde.Layout, offset: int, data: bytes, weight: float,
                   turn: int | None = None) -> None:
        """Add ``weight`` times the tensor elements inside one ``raw`` payload chunk.

        Raises:
            SumDiscardedError: ``turn`` is closed.
        """
        with self._lock:
            self._enter(turn)
            self._accumulators()
            for entry, t_start, c_start, nbytes in serde.segments(layout, offset, len(data)):
                size = torch.empty((), dtype=entry.torch_dtype).element_size()
                values = serde.readonly_tensor(data, entry.torch_dtype, nbytes // size, c_start)
                acc = self._flat[entry.name][t_start // size:(t_start + nbytes) // size]
                acc.add_(values.to(acc.dtype) * float(weight))  # the same roundings as aggregate()

    def fold_state_dict(self, state: Mapping[str, torch.Tensor], weight: float, turn: int | None = None) -> None:
        """Add ``weight`` times a whole client state dict, and count it as one update."""
        with self._lock:
            self._enter(turn)
            for name, acc in self._accumulators().items():
                acc.add_(state[name].to(acc.dtype) * float(weight))
            self._count(weight, turn)

    def count_update(self, weight: float, turn: int | None = None) -> None:
        """Record that one client update (of weight ``weight``) has been folded completely."""
        with self._lock:
            self._count(weight, turn)

    def _count(self, weight: float, turn: int | None) -> None:
        if turn is not None and turn != self._turn:
            raise SumDiscardedError("this update's turn at the running sum was closed before it was counted")
        self.total_weight += float(weight)
        self.num_updates += 1

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean, divided in place (the sum is gone); the caller drops it when done.

        Raises:
            ValueError: nothing was folded.
        """
        with self._lock:
            if self.total_weight <= 0 or self._acc is None:
                raise ValueError("no client update was folded in this round")
            mean = self._acc
            for acc in mean.values():
                acc.div_(self.total_weight)
            self._acc, self._flat = None, {}
            self.total_weight, self.num_updates = 0.0, 0
            return mean


class SumDiscardedError(RuntimeError):
    """An update was added through a turn that is closed (see :meth:`RunningSum.turn`)."""


class UpdateTurn:
    """One update's turn at a :class:`RunningSum`: it adds through the sum's methods with its turn number, so once
    the turn is closed (:meth:`RunningSum.abandon`, or the next turn opened) nothing more of that update is added,
    even by a handler thread still reading its stream."""

    def __init__(self, running: RunningSum, turn: int):
        self.running, self.number, self.layout = running, turn, running.layout

    def fold_chunk(self, layout: serde.Layout, offset: int, data: bytes, weight: float) -> None:
        self.running.fold_chunk(layout, offset, data, weight, self.number)

    def fold_state_dict(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        self.running.fold_state_dict(state, weight, self.number)

    def count_update(self, weight: float) -> None:
        self.running.count_update(weight, self.number)


class SumStrategy(Strategy):
    """A strategy whose round starts from the weighted mean of the updates (FedAvg and the server optimizers
    built on it). Subclasses override :meth:`apply` only.

    Args:
        weighted: weight each update by its sample count n_k (False: a plain mean).
        **policy: see :class:`~flmem.strategies.base.Strategy`.
    """

    combine = "sum"

    def __init__(self, *, weighted: bool = True, **policy):
        super().__init__(**policy)
        self.weighted = bool(weighted)
        self.running: RunningSum | None = None

    def weight(self, num_samples: int) -> float:
        return float(num_samples) if self.weighted else 1.0

    def begin_round(self, round_idx: int, global_state: Mapping[str, torch.Tensor]) -> None:
        super().begin_round(round_idx, global_state)
        if self.running is None:
            self.running = RunningSum(global_state)

    def end_round(self, round_idx: int, global_state: Mapping[str, torch.Tensor], streaming: bool) -> dict:
        if streaming:
            mean = self.running.mean()
        else:
            mean = aggregate(self.ordered_updates())
            self.updates = {}  # the original path holds the N models until here
        with torch.no_grad():
            metrics = self.apply(global_state, mean)
        del mean
        return metrics

    def apply(self, global_state: Mapping[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> dict:
        """Turn the weighted mean of the updates (float32/float64, may be overwritten) into the global model."""
        raise NotImplementedError

    def discard_round(self) -> None:
        super().discard_round()
        self.running = None


class FedAvg(SumStrategy):
    """FedAvg: the next global model is the weighted mean of the client updates."""

    def apply(self, global_state: Mapping[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> dict:
        for name, target in global_state.items():
            target.copy_(cast(mean[name], target.dtype))
        return {}


class FedProx(FedAvg):
    """FedProx: FedAvg on the server; each client minimizes loss + (mu / 2) * ||w - w_global||^2.

    Args:
        proximal_mu: mu >= 0 (0 is FedAvg).
    """

    def __init__(self, *, proximal_mu: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        if float(proximal_mu) < 0:
            raise ValueError(f"strategy.proximal_mu={proximal_mu}: must be >= 0")
        self.proximal_mu = float(proximal_mu)
