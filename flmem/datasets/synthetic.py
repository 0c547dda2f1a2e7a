"""``dataset=synthetic``: CIFAR-shaped images made from the seed (flmem.synthetic); no files, no download."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flmem.datasets.base import ImageSource


@dataclass(kw_only=True)
class SyntheticImages(ImageSource):
    """``train_size``/``test_size`` images per split, each a class pattern plus noise (flmem.synthetic)."""
    train_size: int = 4096
    test_size: int = 1024

    def load_split(self, train: bool):
        from flmem import synthetic
        from flmem.datasets.split import SplitData

        return self.checked_shape(SplitData(*synthetic.split(self, train)))

    def client_split(self, rank: int, num_clients: int):
        """Removes the whole training split: the noise is still drawn for every sample, in order, but only
        this client's images are made and kept."""
        from flmem import synthetic
        from flmem.datasets.split import SplitData

        labels = synthetic.prepare(self, True)[2]
        return SplitData(*synthetic.samples(self, True, self.client_indices(labels, rank, num_clients)))

    def test_rows(self):
        """Removes the rest of the test split: only the evaluated samples are made."""
        from flmem import synthetic
        from flmem.datasets.split import SplitData

        n = int(self.test_size)
        rows = np.arange(n if self.test_samples is None else min(n, int(self.test_samples)))
        return SplitData(*synthetic.samples(self, False, rows))
