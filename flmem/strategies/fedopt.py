"""Adaptive server optimizers: FedAdam, FedYogi and FedAdagrad (Reddi et al., 2021, "Adaptive Federated
Optimization", Algorithm 2).

Each round the server treats the (weighted) mean of the client updates minus the global model as a
pseudo-gradient Delta and takes one optimizer step on the global model x (elementwise, per floating tensor)::

    m = beta_1 * m + (1 - beta_1) * Delta
    v = v + Delta^2                                          (FedAdagrad)
    v = v - (1 - beta_2) * Delta^2 * sign(v - Delta^2)       (FedYogi)
    v = beta_2 * v + (1 - beta_2) * Delta^2                  (FedAdam)
    x = x + eta * m / (sqrt(v) + tau)

with m = 0 and v = tau^2 before the first round, as in the paper (no bias correction; Flower's FedAdam adds
one). Integer tensors (BatchNorm's ``num_batches_tracked``) take the mean, as in FedAvg. The moments m and v
(two model copies in float32) live for the whole job; on the optimized path the mean comes from one running sum,
so the server holds the global model, the sum and the two moments whatever the number of clients.
"""
from __future__ import annotations

from typing import Mapping

import torch

from flmem.strategies.base import cast
from flmem.strategies.fedavg import SumStrategy

BLOCK = 1 << 18  # elements per block of the server optimizer's step (1 MiB of float32)


class FedOpt(SumStrategy):
    """A server optimizer over the FedAvg mean; subclasses choose the second moment (:meth:`second_moment`).

    Args:
        eta: server learning rate.
        beta_1, beta_2: moment decay rates in [0, 1).
        tau: adaptivity (the root's additive constant), > 0.
        **kwargs: see :class:`~flmem.strategies.fedavg.SumStrategy`.
    Raises:
        ValueError: a value outside its range, naming the key.
    """

    def __init__(self, *, eta: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        for key, value, ok in (("eta", eta, float(eta) > 0), ("beta_1", beta_1, 0 <= float(beta_1) < 1),
                               ("beta_2", beta_2, 0 <= float(beta_2) < 1), ("tau", tau, float(tau) > 0)):
            if not ok:
                raise ValueError(f"strategy.{key}={value}: out of range (eta > 0, 0 <= beta < 1, tau > 0)")
        self.eta, self.beta_1, self.beta_2, self.tau = float(eta), float(beta_1), float(beta_2), float(tau)
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        """Update ``v`` in place from the squared pseudo-gradient ``delta_sq`` (may be overwritten)."""
        raise NotImplementedError

    def apply(self, global_state: Mapping[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> dict:
        sq_norm = 0.0
        for name, x in global_state.items():
            if not x.dtype.is_floating_point:
                x.copy_(cast(mean[name], x.dtype))
                continue
            if name not in self.m:
                self.m[name] = torch.zeros_like(mean[name])
                self.v[name] = torch.full_like(mean[name], self.tau ** 2)
            # A global tensor that is not contiguous (channels_last) steps on a contiguous copy, copied back.
            xc = x if x.is_contiguous() else x.contiguous()
            flat = [t.view(-1) for t in (xc, mean[name], self.m[name], self.v[name])]
            for start in range(0, flat[0].numel(), BLOCK):
                # Block by block: the temporaries of one step are a block each, never a tensor (ResNet-18's
                # largest is 9 MiB); the arithmetic per element is the same.
                sq_norm += self._step(*(t[start:start + BLOCK] for t in flat))
            if xc is not x:
                x.copy_(xc)
        return {"pseudo_gradient_norm": sq_norm ** 0.5}

    def _step(self, x: torch.Tensor, mean: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> float:
        """One optimizer step on a block of x, in place; ``mean`` is overwritten. Returns sum(Delta^2)."""
        delta = mean.sub_(x.to(mean.dtype))
        m.mul_(self.beta_1).add_(delta, alpha=1 - self.beta_1)
        delta_sq = delta.square_()
        sq = float(delta_sq.sum())
        self.second_moment(v, delta_sq)
        step = delta_sq.copy_(v).sqrt_().add_(self.tau)
        step = torch.div(m, step, out=step).mul_(self.eta)
        if x.dtype == step.dtype:
            x.add_(step)
        else:
            x.copy_((x.to(step.dtype) + step).to(x.dtype))
        return sq


class FedAdam(FedOpt):
    """FedAdam: v = beta_2 * v + (1 - beta_2) * Delta^2."""

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.mul_(self.beta_2).add_(delta_sq, alpha=1 - self.beta_2)


class FedYogi(FedOpt):
    """FedYogi: v = v - (1 - beta_2) * Delta^2 * sign(v - Delta^2)."""

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        sign = torch.sign(v - delta_sq)
        v.addcmul_(delta_sq, sign, value=-(1 - self.beta_2))


class FedAdagrad(FedOpt):
    """FedAdagrad: v = v + Delta^2 (beta_2 unused; beta_1 defaults to 0, no momentum)."""

    def __init__(self, *, beta_1: float = 0.0, **kwargs):
        super().__init__(beta_1=beta_1, **kwargs)

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.add_(delta_sq)
