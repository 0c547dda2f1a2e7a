"""Datasets and their partition across clients, one class per source, built from ``conf/dataset/*.yaml``.

Each yaml names its class in ``_target_``; ``hydra.utils.instantiate(cfg.dataset)`` builds it with the
yaml's other keys as keyword arguments, and every role calls the same three methods
(:class:`flmem.datasets.base.DataSource`): ``check_available()`` (the launcher, once, before any
process starts), ``client_dataset(rank, num_clients, release)`` (a client) and
``test_dataset(release)`` (the server). Sources:

* ``synthetic`` (:class:`flmem.datasets.synthetic.SyntheticImages`): CIFAR-shaped (3x32x32, 10 classes)
  images made from a seed.
* ``tokens`` (:class:`flmem.datasets.tokens.SyntheticTokens`): synthetic token sequences for the
  decoder-only language model.
* ``cifar`` (:class:`flmem.datasets.cifar.CIFAR10`): CIFAR-10 in torchvision's layout,
  ``ROOT/cifar-10-batches-py``.
* ``mnist`` / ``fashion_mnist`` (:class:`flmem.datasets.mnist.MNIST`, :class:`flmem.datasets.mnist.FashionMNIST`):
  IDX files in torchvision's layout, ``ROOT/MNIST/raw`` or ``ROOT/FashionMNIST/raw``, gzipped or not;
  ``fashion_mnist`` also finds Debian's ``dataset-fashion-mnist`` package in ``/usr/share/datasets/fashion-mnist``.

Importing this package, building a source and ``check_available()`` import neither torch nor
torchvision (the launcher runs them): only the methods that load samples do, in the role processes.
Loading never checks torchvision's md5 sums, so re-encoded copies load too. On the optimized path
(``optimization.release``) a role reads or makes only the samples it keeps.
"""
from __future__ import annotations

from flmem.cifar import CifarFormatError
from flmem.datasets.base import DatasetNotFoundError, DataSource, LabelRangeError
from flmem.idx import IdxFormatError

# What a bad or missing data file raises (ValueError or FileNotFoundError subclasses), each naming the file and the fix.
DATA_ERRORS = (DatasetNotFoundError, IdxFormatError, CifarFormatError, LabelRangeError)

__all__ = ["DATA_ERRORS", "CifarFormatError", "DataSource", "DatasetNotFoundError", "IdxFormatError",
           "LabelRangeError"]
