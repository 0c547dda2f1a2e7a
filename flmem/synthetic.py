"""Data made from a seed: CIFAR-shaped images and token sequences. No files, no download.

Images are ``uint8`` ``[N, C, H, W]`` with ``int64`` labels ``[N]``: a smooth per-class pattern
plus noise, so a model can learn it. ``split`` makes a whole split (the original path), ``samples``
only some samples of it, equal bit for bit (the optimized path). Each returns ``(inputs, labels)``.
"""
from __future__ import annotations

import numpy as np
import torch


def prepare(cfg, train: bool):
    """The split's size, class patterns [K, C, H, W] (float), labels [N] and the generator, ready for the noise."""
    n = cfg.train_size if train else cfg.test_size
    gen = torch.Generator().manual_seed(int(cfg.seed) * 2 + (0 if train else 1))
    proto_gen = torch.Generator().manual_seed(int(cfg.seed))  # same class patterns in both splits
    c, s, k = cfg.channels, cfg.image_size, cfg.num_classes
    coarse = torch.rand(k, c, 4, 4, generator=proto_gen)
    patterns = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    return n, patterns, torch.randint(0, k, (n,), generator=gen), gen


def split(cfg, train: bool, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split: images ``uint8`` [N, C, H, W] (N = ``train_size`` or ``test_size``), labels [N]."""
    n, patterns, labels, gen = prepare(cfg, train)
    c, s = cfg.channels, cfg.image_size
    images = torch.empty(n, c, s, s, dtype=torch.uint8)
    for start in range(0, n, block):  # in blocks: float temporaries stay small next to the uint8 result
        stop = min(n, start + block)
        noise = torch.rand(stop - start, c, s, s, generator=gen)
        images[start:stop] = (0.25 * patterns[labels[start:stop]] + 0.75 * noise).mul_(255).round_().to(torch.uint8)
    return images, labels


def samples(cfg, train: bool, rows: np.ndarray, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``rows`` (indices [R], any order) of the synthetic split, equal bit for bit to ``split``'s.

    The generator's noise is drawn in the same order (a draw of ``a + b`` values equals draws of ``a``
    then ``b``), up to the last wanted row, ``block`` rows at a time; only wanted rows are kept.
    """
    n, patterns, labels, gen = prepare(cfg, train)
    c, s = cfg.channels, cfg.image_size
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    images = torch.empty(len(rows), c, s, s, dtype=torch.uint8)
    for start in range(0, int(wanted[-1]) + 1 if len(rows) else 0, block):
        stop = min(n, start + block)
        noise = torch.rand(stop - start, c, s, s, generator=gen)
        lo, hi = np.searchsorted(wanted, [start, stop])
        if lo < hi:
            mine = torch.from_numpy(wanted[lo:hi])
            images[torch.from_numpy(order[lo:hi])] = \
                (0.25 * patterns[labels[mine]] + 0.75 * noise[mine - start]).mul_(255).round_().to(torch.uint8)
    return images, labels[torch.from_numpy(rows)].clone()


def tokens(cfg, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic language-model data: each sequence mostly follows t -> (5t + 3) mod V, with 10% random tokens."""
    n = cfg.train_size if train else cfg.test_size
    gen = torch.Generator().manual_seed(int(cfg.seed) * 2 + (0 if train else 1))
    v, t = int(cfg.vocab_size), int(cfg.seq_len)
    seq = torch.empty(n, t + 1, dtype=torch.int64)
    seq[:, 0] = torch.randint(0, v, (n,), generator=gen)
    noise = torch.rand(n, t, generator=gen) < 0.1
    random_tokens = torch.randint(0, v, (n, t), generator=gen)
    for i in range(t):
        seq[:, i + 1] = torch.where(noise[:, i], random_tokens[:, i], (5 * seq[:, i] + 3) % v)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
