"""Loading the real on-disk formats, the Debian Fashion-MNIST files, partitions, and missing-data errors."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from flmem import data
from tests.conftest import write_cifar, write_idx


def ds_cfg(name, root, **extra):
    base = {"synthetic": (3, 32), "cifar": (3, 32), "mnist": (1, 28), "fashion_mnist": (1, 28)}[name]
    cfg = {"name": name, "root": str(root), "download": False, "channels": base[0], "image_size": base[1],
           "num_classes": 10, "samples_per_client": None, "test_samples": None, "partition": "iid", "alpha": 0.5,
           "seed": 0, "train_size": 256, "test_size": 64}
    return OmegaConf.create({**cfg, **extra})


def test_cifar_batches_load_without_md5(tmp_path):
    write_cifar(tmp_path, per_batch=10, test=7)
    train, test = data.load_split(ds_cfg("cifar", tmp_path), True), data.load_split(ds_cfg("cifar", tmp_path), False)
    assert train.images.shape == (50, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (7, 3, 32, 32) and test.labels.dtype == torch.int64
    import pickle
    raw = pickle.load(open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb"), encoding="latin1")
    assert torch.equal(train.images[0].reshape(-1), torch.from_numpy(raw["data"][0]))  # CHW row-major, as stored


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_loads_gzipped_or_plain(tmp_path, gz):
    write_idx(tmp_path / "MNIST" / "raw", train=30, test=12, gz=gz)
    train = data.load_split(ds_cfg("mnist", tmp_path), True)
    assert train.images.shape == (30, 1, 28, 28) and train.labels.shape == (30,)
    assert int(train.labels.max()) < 10


def test_fashion_mnist_from_debian_package(tmp_path):
    assert data.DEBIAN_FASHION_MNIST.is_dir(), "install it: apt-get install dataset-fashion-mnist"
    cfg = ds_cfg("fashion_mnist", tmp_path / "empty")
    train, test = data.load_split(cfg, True), data.load_split(cfg, False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10  # the real test split is balanced


@pytest.mark.parametrize("name, expected", [
    ("cifar", "cifar-10-batches-py lacks data_batch_1"),
    ("mnist", "no train-images-idx3-ubyte"),
])
def test_missing_files_name_path_files_and_fix(tmp_path, name, expected):
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.check_available(ds_cfg(name, tmp_path))
    message = str(err.value)
    assert expected in message and str(tmp_path) in message and "dataset.download=true" in message


def test_shape_mismatch_names_the_keys(tmp_path):
    write_idx(tmp_path / "MNIST" / "raw", train=5, test=5)
    with pytest.raises(ValueError, match="dataset.channels=3"):
        data.load_split(ds_cfg("mnist", tmp_path, channels=3), True)


def test_iid_partition_is_disjoint_and_complete():
    parts = data.partition(np.arange(100) % 10, 3, "iid", 0.5, seed=1)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(100)) and [len(p) for p in parts] == [34, 33, 33]


def test_dirichlet_partition_skews_labels_and_is_seeded():
    labels = np.repeat(np.arange(10), 100)
    parts = data.partition(labels, 4, "dirichlet", 0.1, seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    shares = [np.bincount(labels[p], minlength=10).max() / max(len(p), 1) for p in parts if len(p)]
    assert max(shares) > 0.4  # alpha=0.1: some client is dominated by one class
    again = data.partition(labels, 4, "dirichlet", 0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


@pytest.mark.parametrize("release", [False, True])
def test_client_dataset_same_samples_on_both_paths(release):
    cfg = ds_cfg("synthetic", "", samples_per_client=40)
    ds = data.client_dataset(cfg, rank=1, num_clients=2, release=release)
    reference = data.client_dataset(cfg, rank=1, num_clients=2, release=not release)
    assert len(ds) == 40
    for i in (0, 17, 39):
        assert torch.equal(ds[i][0], reference[i][0]) and ds[i][1] == reference[i][1]


def test_cifar_client_reads_the_same_samples_batch_by_batch(tmp_path):
    import memray

    write_cifar(tmp_path, per_batch=2000, test=10)  # 6 MB per batch file, 30 MB of training images
    cfg = ds_cfg("cifar", tmp_path, samples_per_client=500)
    peaks = {}
    for release in (False, True):
        with memray.Tracker(tmp_path / f"{release}.bin", file_format=memray.FileFormat.AGGREGATED_ALLOCATIONS):
            ds = data.client_dataset(cfg, rank=1, num_clients=3, release=release)
        peaks[release] = memray.FileReader(str(tmp_path / f"{release}.bin")).metadata.peak_memory
        if release:
            assert len(ds) == 500 and all(torch.equal(ds[i][0], reference[i][0]) and ds[i][1] == reference[i][1]
                                          for i in (0, 123, 499))
        reference = ds
    assert peaks[True] < 0.5 * peaks[False], peaks  # one batch file at a time, not the whole split twice


def test_cifar_test_split_is_the_same_read_directly(tmp_path):
    write_cifar(tmp_path, per_batch=5, test=30)
    cfg = ds_cfg("cifar", tmp_path, test_samples=20)
    direct, reference = data.test_dataset(cfg, release=True), data.test_dataset(cfg, release=False)
    assert len(direct) == len(reference) == 20
    assert all(torch.equal(direct[i][0], reference[i][0]) and direct[i][1] == reference[i][1] for i in range(20))
