"""Samples in memory: a split's tensors and the ``torch`` dataset that reads them.

Images are held as ``uint8`` tensors ``[N, C, H, W]`` with ``int64`` labels ``[N]`` and normalized
per sample when read; token data as ``int64`` ids ``[N, T]`` with next tokens ``[N, T]``. Imports torch:
only the role processes import this module (the sources import it inside the methods that load).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SplitData:
    images: torch.Tensor  # uint8 images [N, C, H, W], or int64 token ids [N, T]
    labels: torch.Tensor  # int64 [N] classes, or int64 [N, T] next tokens

    def rows(self, index) -> SplitData:
        """A copy of samples ``index`` (indices [R]); the copy owns its memory, so the split can be dropped."""
        index = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return SplitData(self.images[index].clone(), self.labels[index].clone())

    def head(self, n: int | None) -> SplitData:
        """The first ``n`` samples (all when None), copied out of the split."""
        return self if n is None else SplitData(self.images[:int(n)].clone(), self.labels[:int(n)].clone())


class SplitDataset(torch.utils.data.Dataset):
    """``(input, label)`` pairs: ``uint8`` images scaled to [-1, 1] as ``float32``, token ids as they are."""

    def __init__(self, data: SplitData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data.labels)

    def __getitem__(self, i):
        x = self.data.images[i]
        return (x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x), self.data.labels[i]
