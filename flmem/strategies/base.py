"""The strategy interface: what a round does with the client updates it receives.

The round server (:mod:`flmem.server`) keeps only round synchronisation, transport and timing; a strategy
decides everything else, as Flower's ``Strategy`` does: which clients train in a round
(:meth:`Strategy.sample`, Flower's ``configure_fit``), whether a round with failures still counts
(:meth:`Strategy.check_round`), and how the updates become the next global model. Per round the server calls::

    sample(r, available, seed) -> ranks        which clients train in round r
    begin_round(r, global_state)               before any update of round r arrives
    ... updates arrive (see the two paths below) ...
    end_round(r, global_state) -> metrics      write the round-(r+1) global model into global_state

and takes each update on one of two memory paths, which give the same numbers:

* original (``optimization.aggregation=false``): :meth:`Strategy.accept` keeps every client's whole state dict
  until :meth:`end_round` aggregates them, as common FL servers do;
* optimized: a subclass of :class:`SumStrategy` (``combine = "sum"``) folds each update chunk by chunk into one
  running sum, one update at a time in rank order; a subclass of :class:`~flmem.strategies.robust.CoordinateWise`
  (``combine = "coordinate"``) reduces chunk k of every update together, holding N chunks, not N models.

A new strategy is one class here and one yaml in ``conf/strategy/`` (``_target_`` naming the class).
"""
from __future__ import annotations

import random
from typing import Mapping, Sequence

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a strategy computes in: float32 for 16/32-bit floats, float64 for float64 and integers."""
    if dtype.is_floating_point:
        return torch.float64 if dtype == torch.float64 else torch.float32
    return torch.float64


def cast(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` (in :func:`acc_dtype`) back in the model's dtype; integers are rounded half to even."""
    return value.to(dtype) if dtype.is_floating_point else value.round().to(dtype)


class Strategy:
    """Client sampling, the failure policy, and the round's aggregation (abstract: see the subclasses).

    Args:
        fraction_fit: fraction of the available clients sampled per round (Flower's name); the sample is
            ``max(int(fraction_fit * available), min_fit_clients)`` ranks, drawn with the job's seed.
        min_fit_clients: a round needs at least this many client updates; fewer ends the job.
        accept_failures: False: any failed, late or refused update ends the job (Flower's name).
    Raises:
        ValueError: a value outside its range, naming the key.
    """

    #: how the optimized path takes updates: "sum" (a running sum) or "coordinate" (aligned chunks)
    combine = "sum"
    #: FedProx's mu; the client adds (mu / 2) * ||w - w_global||^2 to its loss when it is not 0
    proximal_mu = 0.0

    def __init__(self, *, fraction_fit: float = 1.0, min_fit_clients: int = 1, accept_failures: bool = True):
        if not 0.0 < float(fraction_fit) <= 1.0:
            raise ValueError(f"strategy.fraction_fit={fraction_fit}: must be in (0, 1]")
        if int(min_fit_clients) < 1:
            raise ValueError(f"strategy.min_fit_clients={min_fit_clients}: must be at least 1")
        self.fraction_fit, self.min_fit_clients = float(fraction_fit), int(min_fit_clients)
        self.accept_failures = bool(accept_failures)
        self.updates: dict[int, tuple[Mapping[str, torch.Tensor], float]] = {}

    @property
    def name(self) -> str:
        return type(self).__name__

    # ------------------------------------------------------------ participation
    def sample(self, round_idx: int, available: Sequence[int], seed: int) -> list[int]:
        """The ranks that train in round ``round_idx``, sorted; the same for the same seed, round and ranks.

        Raises:
            ValueError: fewer available clients than ``min_fit_clients``.
        """
        ranks = sorted(available)
        size = max(int(self.fraction_fit * len(ranks)), self.min_fit_clients)
        if size > len(ranks):
            raise ValueError(f"round {round_idx}: {len(ranks)} client(s) available ({ranks}), but "
                             f"strategy.min_fit_clients={self.min_fit_clients}")
        if size == len(ranks):
            return ranks
        return sorted(random.Random(int(seed) * 1_000_003 + round_idx).sample(ranks, size))

    def check_round(self, round_idx: int, arrived: Sequence[int], failures: Sequence[dict]) -> None:
        """Raise RoundFailedError unless the round may be aggregated with the updates of ``arrived``; the message
        counts the updates out of the sampled clients (``arrived`` and ``failures``) and names the late and the
        failed clients apart."""
        sampled = len(arrived) + len(failures)
        if failures and not self.accept_failures:
            raise RoundFailedError(f"round {round_idx}: {len(failures)} of {sampled} client updates failed and "
                                   f"strategy.accept_failures=false; {describe_failures(failures)}")
        if len(arrived) < self.min_fit_clients:
            raise RoundFailedError(f"round {round_idx}: only {len(arrived)} of {sampled} client updates arrived "
                                   f"(arrived: {list(arrived) or 'none'}), strategy.min_fit_clients="
                                   f"{self.min_fit_clients}; {describe_failures(failures)}")

    # ------------------------------------------------------------ the round
    def weight(self, num_samples: int) -> float:
        """The aggregation weight of an update from ``num_samples`` local samples (1: unweighted)."""
        return 1.0

    def begin_round(self, round_idx: int, global_state: Mapping[str, torch.Tensor]) -> None:
        self.updates = {}

    def accept(self, rank: int, weight: float, update: Mapping[str, torch.Tensor]) -> None:
        """Original path: keep client ``rank``'s whole update until :meth:`end_round`."""
        self.updates[rank] = (update, weight)

    def ordered_updates(self) -> list[tuple[Mapping[str, torch.Tensor], float]]:
        """The kept updates in rank order: the same order, hence the same floats, whatever the arrival order."""
        return [self.updates[k] for k in sorted(self.updates)]

    def end_round(self, round_idx: int, global_state: Mapping[str, torch.Tensor], streaming: bool) -> dict:
        """Write the next global model into ``global_state``; returns the round's strategy metrics."""
        raise NotImplementedError

    def discard_round(self) -> None:
        """Drop what the round holds (the round failed)."""
        self.updates = {}


def describe_failures(failures: Sequence[dict]) -> str:
    """``failures`` (``{"rank", "reason"}`` records) as text: the late clients (sent nothing in time) apart from
    the failed ones (left, refused, broken stream), each with its reason."""
    late = [f for f in failures if f["reason"].startswith("late")]
    failed = [f for f in failures if not f["reason"].startswith("late")]
    late_text = "; ".join(f"client {f['rank']} ({f['reason'].removeprefix('late: ')})" for f in late)
    failed_text = "; ".join(f"client {f['rank']}: {f['reason']}" for f in failed)
    return f"late: {late_text or 'none'}. Failed: {failed_text or 'none'}"


class RoundFailedError(RuntimeError):
    """A round cannot be aggregated under the strategy's failure policy."""
