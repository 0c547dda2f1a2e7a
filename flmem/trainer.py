"""Local training of one client for one round, and evaluation of a model.

The trainer keeps the model it received at the start of a round to report how far local
training moved it (``update_norm``, the L2 norm of w_local - w_global over parameters).

* Original path: ``copy.deepcopy(model)`` (module, parameters, buffers and all) and
  out-of-place arithmetic; the copy and the optimizer live until the next round replaces them.
* Optimized path: ``clone().detach()`` of the parameters only, in-place arithmetic, and (with
  ``release``) the copy and optimizer state dropped as soon as the round ends.
"""
from __future__ import annotations

import copy
import gc
import math
from typing import Callable, Iterable

import torch
from torch import nn


class Perturber:
    """Communication-only client: each round adds seeded Gaussian noise (std ``scale``) to the parameters
    in place, block by block, without gradient steps. This profiles transport and aggregation at model
    sizes whose training would not fit the machine, as LLM-scale FL profiling does.
    """

    def __init__(self, model: nn.Module, num_samples: int, *, seed: int, rank: int, scale: float = 1e-3,
                 block: int = 1 << 20):
        self.model, self.num_samples = model, num_samples
        self.seed, self.rank, self.scale, self.block = seed, rank, scale, block

    @torch.no_grad()
    def train_round(self, round_idx: int) -> dict:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 1009 + round_idx)
        for p in self.model.parameters():
            if not p.dtype.is_floating_point:
                continue
            target = p if p.is_contiguous() else p.contiguous()  # channels_last: through a contiguous copy
            flat = target.view(-1)
            for start in range(0, flat.numel(), self.block):  # noise one block at a time, never a model's worth
                piece = flat[start:start + self.block]
                piece.add_(torch.randn(piece.shape, generator=gen, dtype=p.dtype), alpha=self.scale)
            if target is not p:
                p.copy_(target)
        return {"loss": 0.0, "update_norm": None, "steps": 0, "samples": self.num_samples}


class Trainer:
    """Runs ``local_steps`` minibatch steps per round on one client's data.

    Args:
        model: the client's model; its parameters are trained in place.
        dataset: the client's samples (``(image, label)`` pairs).
        batch_size, local_steps: the run keys of the same names.
        optimizer: a function of the parameters that returns a new ``torch.optim.Optimizer``, as
            ``hydra.utils.instantiate(cfg.optimizer)`` gives (conf/optimizer/*.yaml, ``_partial_: true``),
            e.g. ``functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)``; called once per round.
        seed: base seed; round r's batch order depends on (seed, rank, r) only, so the
            original and optimized paths see the same batches.
        optimized: clone/in-place instead of deepcopy/out-of-place.
        release: drop the round's copies as soon as they are dead.
        proximal_mu: FedProx's mu (Li et al., 2020): each step minimizes loss + (mu / 2) * ||w - w_global||^2,
            w_global being the round's global model, which the trainer keeps anyway (see the module docstring).
            The recorded loss is the task loss alone on both paths.
    """

    def __init__(self, model: nn.Module, dataset, *, batch_size: int, local_steps: int,
                 optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer], seed: int, rank: int,
                 optimized: bool, release: bool, proximal_mu: float = 0.0):
        self.model, self.dataset = model, dataset
        self.batch_size, self.local_steps = batch_size, local_steps
        self.make_optimizer = optimizer
        optimizer(list(model.parameters()))  # built once now: a bad optimizer argument fails before connecting
        self.seed, self.rank = seed, rank
        self.optimized, self.release = optimized, release
        self.proximal_mu = float(proximal_mu)
        self.previous = None
        self.optimizer = None

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def _batches(self, round_idx: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 1009 + round_idx)
        while True:  # cycle the local data for as many steps as asked
            loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True,
                                                 generator=gen, drop_last=False)
            yield from loader

    def train_round(self, round_idx: int) -> dict:
        """One round of local training. Returns ``{"loss", "update_norm", "steps", "samples"}``."""
        torch.manual_seed(self.seed + 7919 * self.rank + round_idx)
        if self.optimized:
            # Removes deepcopy's copy of the whole module (buffers, grads, Python objects): parameters only.
            self.previous = [p.detach().clone() for p in self.model.parameters()]
        else:
            self.previous = copy.deepcopy(self.model)
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.model.train()
        losses, batches = [], self._batches(round_idx)
        for _ in range(self.local_steps):
            x, y = next(batches)
            self.optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(self.model(x).flatten(0, -2), y.flatten())
            losses.append(loss.item())
            if self.proximal_mu and not self.optimized:  # FedProx as common code writes it: a term in the graph
                proximal = sum((p - g).norm(2) ** 2 for p, g in zip(self.model.parameters(),
                                                                     self.previous.parameters()))
                loss = loss + (self.proximal_mu / 2) * proximal
            loss.backward()
            if self.proximal_mu and self.optimized:
                self._add_proximal_gradient()
            self.optimizer.step()
        update_norm = self._update_norm()
        if self.release:
            self.previous = self.optimizer = None
            self.model.zero_grad(set_to_none=True)
            gc.collect()
        return {"loss": sum(losses) / len(losses), "update_norm": update_norm, "steps": self.local_steps,
                "samples": self.num_samples}

    @torch.no_grad()
    def _add_proximal_gradient(self) -> None:
        # Removes the proximal term's autograd graph (a difference, a norm and their gradients per tensor): its
        # gradient mu * (w - w_global) is added to each parameter's gradient in place.
        for p, g in zip(self.model.parameters(), self.previous):
            if p.grad is not None:
                p.grad.add_(p, alpha=self.proximal_mu).sub_(g, alpha=self.proximal_mu)

    @torch.no_grad()
    def _update_norm(self) -> float:
        if self.optimized:
            total = 0.0
            for prev, p in zip(self.previous, self.model.parameters()):
                total += float(prev.sub_(p).square_().sum())  # in place: prev is dead after this
            return math.sqrt(total)
        diffs = [(p - q) ** 2 for p, q in zip(self.model.parameters(), self.previous.parameters())]
        return math.sqrt(float(sum(d.sum() for d in diffs)))


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 256) -> dict:
    """Mean cross-entropy loss and accuracy (fraction in [0, 1]) of ``model`` on ``dataset``.

    ``samples`` counts predictions: images, or tokens for a language model.
    """
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        logits = model(x)  # [B, classes] for images, [B, T, vocab] for tokens
        loss += float(nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += y.numel()
    return {"loss": loss / max(n, 1), "accuracy": correct / max(n, 1), "samples": n}
