"""The interface every data source implements, and what the image sources share.

A source is built from its ``conf/dataset/*.yaml`` by ``hydra.utils.instantiate(cfg.dataset)``: the
yaml's keys become the dataclass's fields (a key the class lacks is refused by ``__init__``). The
launcher calls :meth:`DataSource.check_available` once before any process starts; a client calls
:meth:`DataSource.client_dataset`, the server :meth:`DataSource.test_dataset`. torch is imported only
inside the methods that load samples, so building a source and checking its files stay torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where the config says, and were not downloaded."""


class LabelRangeError(ValueError):
    """A labels file holds a value that is not a class index of the dataset."""


@dataclass(kw_only=True)
class DataSource:
    """The keys every ``conf/dataset/*.yaml`` holds (see README.md, Configuration).

    ``name``: the option's name (shown by reports and browse); ``root``: the folder holding the files
    (None for generated data); ``download``: fetch missing files through torchvision;
    ``samples_per_client``/``test_samples``: cuts (None: all); ``partition``: ``iid`` or ``dirichlet``
    with concentration ``alpha``; ``seed``: partition and generation seed.
    """
    name: str
    root: str | None = None
    download: bool = False
    samples_per_client: int | None = None
    test_samples: int | None = None
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0

    def check_available(self) -> None:
        """Make sure the files exist (downloading them when ``download``) and hold what they should, reading
        no samples. Generated data: nothing to check. Raises what :data:`flmem.datasets.DATA_ERRORS` lists."""

    def load_split(self, train: bool):
        """The whole train or test split as :class:`flmem.datasets.split.SplitData`."""
        raise NotImplementedError

    def client_split(self, rank: int, num_clients: int):
        """Client ``rank``'s training samples, released path: the default copies them out of the whole
        split and drops it; sources that can read or make only these samples override it."""
        full = self.load_split(True)
        return full.rows(self.client_indices(full.labels, rank, num_clients))

    def test_rows(self):
        """The evaluated test samples, released path: the default cuts them out of the whole split."""
        return self.load_split(False).head(self.test_samples)

    def client_indices(self, labels, rank: int, num_clients: int) -> np.ndarray:
        from flmem.datasets.partition import client_indices

        return client_indices(self, labels, rank, num_clients)

    def client_dataset(self, rank: int, num_clients: int, release: bool):
        """Client ``rank``'s training samples, a ``torch.utils.data.Dataset`` of ``(input, label)``.

        Original path: a ``Subset`` over the whole split, which keeps every client's samples alive.
        Optimized (``release``): :meth:`client_split`, only the client's own samples. Both paths give the
        same samples in the same order.

        Raises DatasetNotFoundError (files missing), IdxFormatError, CifarFormatError or LabelRangeError (a
        file that is not what its dataset holds; ValueErrors), ValueError (shape differs from the config, or
        the client gets no sample).
        """
        import torch

        from flmem.datasets.split import SplitDataset

        if release:
            return SplitDataset(self.client_split(rank, num_clients))
        full = self.load_split(True)
        idx = self.client_indices(full.labels, rank, num_clients)
        return torch.utils.data.Subset(SplitDataset(full), idx.tolist())

    def test_dataset(self, release: bool = False):
        """The first ``test_samples`` samples of the test split (all when None), as a ``torch`` Dataset.

        With ``release`` only those samples are read or made where the source can (:meth:`test_rows`).
        Both paths give the same samples. Raises as :meth:`client_dataset`.
        """
        from flmem.datasets.split import SplitDataset

        if release:
            return SplitDataset(self.test_rows())
        return SplitDataset(self.load_split(False).head(self.test_samples))


@dataclass(kw_only=True)
class ImageSource(DataSource):
    """A source of images ``channels`` x ``image_size`` x ``image_size`` in ``num_classes`` classes."""
    channels: int = 3
    image_size: int = 32
    num_classes: int = 10

    def checked_labels(self, labels, path: Path) -> np.ndarray:
        """``labels`` (a list or array of N values) as ``int64`` ``[N]``, each in ``0..num_classes-1``.

        Raises LabelRangeError naming ``path``, the first bad value, its position and the rule.
        """
        try:
            values = np.asarray(labels)
            ok_type = values.ndim == 1 and (values.dtype.kind in "iu" or values.size == 0)
        except (ValueError, TypeError):
            ok_type = False
        if not ok_type:
            raise LabelRangeError(f"{path}: labels are not a list of integers; replace the file with the dataset's")
        values = values.astype(np.int64)
        n = int(self.num_classes)
        bad = np.flatnonzero((values < 0) | (values >= n))
        if len(bad):
            raise LabelRangeError(
                f"{path}: label {int(values[bad[0]])} (sample {int(bad[0])}, {len(bad)} such) is not a class index: "
                f"labels must be in 0..{n - 1} (dataset.num_classes={n}); replace the file with the dataset's, "
                f"or set dataset.num_classes to the number of classes the files hold")
        return values

    def checked_shape(self, data):
        """``data`` (SplitData) unchanged; ValueError when its images are not ``channels`` x ``image_size``²."""
        _, c, h, w = data.images.shape
        if (c, h, w) != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"dataset={self.name}: images are {c}x{h}x{w}, but dataset.channels={self.channels} and "
                             f"dataset.image_size={self.image_size}; fix those keys in conf/dataset/{self.name}.yaml")
        return data
