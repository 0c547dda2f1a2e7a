"""A client's data loading, measured with memray in this process: on the optimized path its peak heap
is bounded by its own samples' bytes, whatever the size of the split; the original path holds the split.

Each case's training split is much larger than the client's part (20x or more), so the bound
below separates the two paths: the original path must exceed it.
"""
import gzip
import shutil

import memray
import numpy as np
import pytest
import torch

from flmem.datasets.mnist import DEBIAN_FASHION_MNIST
from tests.conftest import dataset_source, write_cifar, write_idx
from tests.test_data import assert_same_samples

MiB = 1 << 20
CLIENTS = 2


def own_bound(own_bytes: int) -> int:
    """The optimized client's budget: its samples (held once, plus once more while being copied out)
    plus a constant for one read window (1 MiB), decoder buffers, the labels and the partition."""
    return 2 * own_bytes + 4 * MiB


def tracked_peak(path, fn):
    with memray.Tracker(path, file_format=memray.FileFormat.AGGREGATED_ALLOCATIONS):
        result = fn()
    return memray.FileReader(str(path)).metadata.peak_memory, result


def cifar(tmp_path, python2=True):
    write_cifar(tmp_path, per_batch=2000, test=10, python2=python2)  # 30 MB of training images
    return dataset_source("cifar", tmp_path, samples_per_client=400)


def idx(tmp_path, gz):
    write_idx(tmp_path / "MNIST" / "raw", train=20000, test=10, gz=gz)  # 15.7 MB of training images
    return dataset_source("mnist", tmp_path, samples_per_client=500)


def fashion(tmp_path):
    return dataset_source("fashion_mnist", tmp_path / "none", samples_per_client=1000)  # Debian's files: 47 MB


def fashion_plain(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for path in DEBIAN_FASHION_MNIST.glob("*.gz"):
        with gzip.open(path) as src, open(raw / path.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return dataset_source("fashion_mnist", tmp_path, samples_per_client=1000)


CASES = {
    "synthetic": lambda tmp: dataset_source("synthetic", "", train_size=8192, samples_per_client=300),  # 25 MB split
    "cifar": cifar,
    "cifar_python3_pickle": lambda tmp: cifar(tmp, python2=False),
    "mnist_gz": lambda tmp: idx(tmp, gz=True),
    "mnist_plain": lambda tmp: idx(tmp, gz=False),
    "fashion_mnist_gz": fashion,
    "fashion_mnist_plain": fashion_plain,
}


@pytest.mark.parametrize("case", list(CASES))
def test_optimized_client_holds_its_own_samples_only(tmp_path, case):
    cfg = CASES[case](tmp_path)
    cfg.client_dataset(rank=1, num_clients=CLIENTS, release=True)  # first calls: imports, caches
    own = cfg.samples_per_client * cfg.channels * cfg.image_size ** 2
    bound = own_bound(own)
    peak, optimized = tracked_peak(tmp_path / "opt.bin",
                                   lambda: cfg.client_dataset(rank=1, num_clients=CLIENTS, release=True))
    assert len(optimized) == cfg.samples_per_client
    assert peak < bound, f"{case}: optimized client peaked at {peak / MiB:.2f} MiB (bound {bound / MiB:.2f} MiB)"
    peak, original = tracked_peak(tmp_path / "org.bin",
                                  lambda: cfg.client_dataset(rank=1, num_clients=CLIENTS, release=False))
    assert peak > bound, f"{case}: the original path ({peak / MiB:.2f} MiB) should hold the whole split"
    for i in np.linspace(0, len(original) - 1, 7).astype(int):
        assert torch.equal(optimized[i][0], original[i][0]) and optimized[i][1] == original[i][1]


@pytest.mark.parametrize("case", ["synthetic", "cifar", "mnist_gz", "fashion_mnist_gz"])
def test_optimized_server_holds_its_test_samples_only(tmp_path, case):
    cfg = CASES[case](tmp_path)
    if case == "synthetic":
        cfg.test_size = 4096  # a 12.6 MB test split
    elif case == "cifar":
        write_cifar(tmp_path, per_batch=10, test=8000)  # a 24 MB test split
    elif case == "mnist_gz":
        write_idx(tmp_path / "MNIST" / "raw", train=10, test=12000, gz=True)  # 9.4 MB
    cfg.test_samples = 300
    cfg.test_dataset(release=True)
    bound = own_bound(300 * cfg.channels * cfg.image_size ** 2)
    peak, optimized = tracked_peak(tmp_path / "opt.bin", lambda: cfg.test_dataset(release=True))
    assert peak < bound, f"{case}: optimized test split peaked at {peak / MiB:.2f} MiB (bound {bound / MiB:.2f} MiB)"
    peak, original = tracked_peak(tmp_path / "org.bin", lambda: cfg.test_dataset(release=False))
    assert peak > bound
    assert_same_samples(optimized, original)
