"""Loading the real on-disk formats, the Debian Fashion-MNIST files, partitions, and missing-data errors."""
import numpy as np
import pytest
import torch

from flmem.datasets import CifarFormatError, DatasetNotFoundError, IdxFormatError, LabelRangeError
from flmem.datasets.mnist import DEBIAN_FASHION_MNIST, IDX_FILES
from flmem.datasets.partition import partition
from flmem.datasets.split import SplitDataset
from tests.conftest import dataset_source, write_cifar, write_idx


def test_cifar_batches_load_without_md5(tmp_path):
    write_cifar(tmp_path, per_batch=10, test=7)
    source = dataset_source("cifar", tmp_path)
    train, test = source.load_split(True), source.load_split(False)
    assert train.images.shape == (50, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (7, 3, 32, 32) and test.labels.dtype == torch.int64
    import pickle
    raw = pickle.load(open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb"), encoding="latin1")
    assert torch.equal(train.images[0].reshape(-1), torch.from_numpy(raw["data"][0]))  # CHW row-major, as stored


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_loads_gzipped_or_plain(tmp_path, gz):
    write_idx(tmp_path / "MNIST" / "raw", train=30, test=12, gz=gz)
    train = dataset_source("mnist", tmp_path).load_split(True)
    assert train.images.shape == (30, 1, 28, 28) and train.labels.shape == (30,)
    assert int(train.labels.max()) < 10


def test_fashion_mnist_from_debian_package(tmp_path):
    assert DEBIAN_FASHION_MNIST.is_dir(), "install it: apt-get install dataset-fashion-mnist"
    cfg = dataset_source("fashion_mnist", tmp_path / "empty")
    train, test = cfg.load_split(True), cfg.load_split(False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10  # the real test split is balanced


@pytest.mark.parametrize("name, expected", [
    ("cifar", "cifar-10-batches-py lacks data_batch_1"),
    ("mnist", "no train-images-idx3-ubyte"),
])  # ds_cfg sets dataset.download=false
def test_missing_files_name_path_files_and_fix(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError) as err:
        dataset_source(name, tmp_path).check_available()
    message = str(err.value)
    assert expected in message and str(tmp_path) in message and "dataset.download=true" in message


@pytest.mark.parametrize("name", ["cifar", "mnist", "fashion_mnist"])
def test_the_datasets_with_files_download_by_default(name):
    from hydra import compose, initialize_config_dir
    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        assert compose("config", overrides=[f"dataset={name}"]).dataset.download is True


@pytest.mark.parametrize("name", ["cifar", "mnist"])
def test_a_failed_download_names_the_folder_the_files_and_the_fix(tmp_path, monkeypatch, free_port, name):
    # No network, whatever this machine has: every request goes to a proxy on a closed local port.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{free_port}")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DatasetNotFoundError) as err:
        dataset_source(name, tmp_path, download=True).check_available()
    message = " ".join(str(err.value).split())
    folder = tmp_path / ("cifar-10-batches-py" if name == "cifar" else "MNIST/raw")
    assert str(folder) in message and "failed" in message and "dataset.download=false" in message
    assert ("lacks data_batch_1" if name == "cifar" else "no train-images-idx3-ubyte") in message


def test_fashion_mnist_finds_debian_files_before_downloading(tmp_path, monkeypatch, free_port):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):  # a download would fail
        monkeypatch.setenv(var, f"http://127.0.0.1:{free_port}")
    dataset_source("fashion_mnist", tmp_path, download=True).check_available()
    assert not (tmp_path / "FashionMNIST").exists()  # nothing was fetched


def test_shape_mismatch_names_the_keys(tmp_path):
    write_idx(tmp_path / "MNIST" / "raw", train=5, test=5)
    with pytest.raises(ValueError, match="dataset.channels=3"):
        dataset_source("mnist", tmp_path, channels=3).load_split(True)


def test_iid_partition_is_disjoint_and_complete():
    parts = partition(np.arange(100) % 10, 3, "iid", 0.5, seed=1)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(100)) and [len(p) for p in parts] == [34, 33, 33]


def test_dirichlet_partition_skews_labels_and_is_seeded():
    labels = np.repeat(np.arange(10), 100)
    parts = partition(labels, 4, "dirichlet", 0.1, seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    shares = [np.bincount(labels[p], minlength=10).max() / max(len(p), 1) for p in parts if len(p)]
    assert max(shares) > 0.4  # alpha=0.1: some client is dominated by one class
    again = partition(labels, 4, "dirichlet", 0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def assert_same_samples(ds, reference):
    assert len(ds) == len(reference)
    for i in range(len(ds)):
        assert torch.equal(ds[i][0], reference[i][0]) and ds[i][1] == reference[i][1], i


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_synthetic_samples_are_identical_bit_for_bit_on_both_paths(scheme):
    cfg = dataset_source("synthetic", "", samples_per_client=None, train_size=700, test_size=300, test_samples=130,
                 partition=scheme)
    for rank in range(3):
        optimized = cfg.client_dataset(rank=rank, num_clients=3, release=True)
        original = cfg.client_dataset(rank=rank, num_clients=3, release=False)
        assert isinstance(optimized, SplitDataset) and isinstance(original, torch.utils.data.Subset)
        assert torch.equal(optimized.data.images, original.dataset.data.images[original.indices])  # the raw bytes
        assert_same_samples(optimized, original)
    direct, reference = cfg.test_dataset(release=True), cfg.test_dataset(release=False)
    assert len(direct) == 130 and torch.equal(direct.data.images, reference.data.images)
    assert torch.equal(direct.data.labels, reference.data.labels)


def idx_dataset(tmp_path, name, gz):
    """A config for mnist (files written here) or fashion_mnist (gzipped or plain copies of Debian's files)."""
    import gzip
    import shutil

    if name == "mnist":
        write_idx(tmp_path / "MNIST" / "raw", train=900, test=70, gz=gz)
    elif not gz:
        raw = tmp_path / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for path in DEBIAN_FASHION_MNIST.glob("*.gz"):
            with gzip.open(path) as src, open(raw / path.stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return dataset_source(name, tmp_path)


@pytest.mark.parametrize("name, gz", [("mnist", True), ("mnist", False), ("fashion_mnist", True),
                                      ("fashion_mnist", False)])
def test_idx_samples_are_the_same_on_both_paths(tmp_path, name, gz):
    cfg = idx_dataset(tmp_path, name, gz)
    cfg.partition, cfg.samples_per_client, cfg.test_samples = "dirichlet", 300, 50
    for rank in (0, 2):
        optimized = cfg.client_dataset(rank=rank, num_clients=3, release=True)
        assert len(optimized) == 300 or name == "mnist"
        assert_same_samples(optimized, cfg.client_dataset(rank=rank, num_clients=3, release=False))
    direct, reference = cfg.test_dataset(release=True), cfg.test_dataset(release=False)
    assert len(direct) == 50 and torch.equal(direct.data.images, reference.data.images)
    assert torch.equal(direct.data.labels, reference.data.labels)


def idx_blob(dims, payload: bytes) -> bytes:
    import struct
    return struct.pack(">I", 0x0800 + len(dims)) + struct.pack(f">{len(dims)}I", *dims) + payload


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("damage, expected", [
    ("truncate", "truncated"),
    ("extend", "too long|longer than"),
    ("magic", "not an IDX file"),
    ("dims", "IDX type 0x08 with 2 dimensions, expected an IDX file of unsigned bytes with 3 dimensions"),
])
def test_a_damaged_idx_file_is_named_with_what_was_expected(tmp_path, gz, damage, expected):
    import gzip

    folder = write_idx(tmp_path / "MNIST" / "raw", train=40, test=10, gz=gz)
    blob = idx_blob((40, 28, 28), bytes(range(256)) * 122 + bytes(128))  # 40 x 784 bytes
    blob = {"truncate": blob[:-100], "extend": blob + b"\0" * 5, "magic": b"PK\3\4" + blob[4:],
            "dims": idx_blob((40, 784), blob[16:])}[damage]
    path = folder / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(blob) if gz else blob)
    cfg = dataset_source("mnist", tmp_path, samples_per_client=5)
    with pytest.raises(IdxFormatError, match=expected) as err:
        cfg.check_available()  # the header and a plain file's size are checked before any role starts
        cfg.client_dataset(rank=0, num_clients=2, release=True)  # a .gz is checked while it is read
    assert str(path) in str(err.value)


def test_images_and_labels_of_different_lengths_are_refused(tmp_path):
    folder = write_idx(tmp_path / "MNIST" / "raw", train=40, test=10, gz=False)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_blob((39,), bytes(39)))
    with pytest.raises(IdxFormatError, match="holds 40 images but .* holds 39 labels"):
        dataset_source("mnist", tmp_path).check_available()


@pytest.mark.parametrize("release", [False, True])
def test_client_dataset_same_samples_on_both_paths(release):
    cfg = dataset_source("synthetic", "", samples_per_client=40)
    ds = cfg.client_dataset(rank=1, num_clients=2, release=release)
    reference = cfg.client_dataset(rank=1, num_clients=2, release=not release)
    assert len(ds) == 40
    for i in (0, 17, 39):
        assert torch.equal(ds[i][0], reference[i][0]) and ds[i][1] == reference[i][1]


def test_cifar_client_reads_the_same_samples_batch_by_batch(tmp_path):
    import memray

    write_cifar(tmp_path, per_batch=2000, test=10)  # 6 MB per batch file, 30 MB of training images
    cfg = dataset_source("cifar", tmp_path, samples_per_client=500)
    peaks = {}
    for release in (False, True):
        with memray.Tracker(tmp_path / f"{release}.bin", file_format=memray.FileFormat.AGGREGATED_ALLOCATIONS):
            ds = cfg.client_dataset(rank=1, num_clients=3, release=release)
        peaks[release] = memray.FileReader(str(tmp_path / f"{release}.bin")).metadata.peak_memory
        if release:
            assert len(ds) == 500 and all(torch.equal(ds[i][0], reference[i][0]) and ds[i][1] == reference[i][1]
                                          for i in (0, 123, 499))
        reference = ds
    assert peaks[True] < 0.5 * peaks[False], peaks  # one batch file at a time, not the whole split twice


@pytest.mark.parametrize("python2", [True, False])
def test_cifar_client_reads_the_same_samples_from_either_pickle(tmp_path, python2):
    write_cifar(tmp_path, per_batch=60, test=30, python2=python2)  # 184 kB batches: their images stay in the files
    cfg = dataset_source("cifar", tmp_path, partition="dirichlet", test_samples=25)
    for rank in range(3):
        assert_same_samples(cfg.client_dataset(rank, 3, release=True), cfg.client_dataset(rank, 3, False))
    assert_same_samples(cfg.test_dataset(release=True), cfg.test_dataset(release=False))


@pytest.mark.parametrize("python2", [True, False])
def test_a_truncated_cifar_batch_is_named(tmp_path, python2):
    folder = write_cifar(tmp_path, per_batch=60, test=30, python2=python2)
    path = folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(CifarFormatError, match="truncated") as err:
        dataset_source("cifar", tmp_path).client_dataset(rank=0, num_clients=2, release=True)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content, expected", [
    ({"labels": [1], "data": print}, "names __builtin__.print, which a CIFAR-10 batch file does not"),
    ({"labels": [1], "data": bytes(3)}, "expected a dict with data and labels"),
    ({"labels": [1, 2], "data": np.zeros((1, 3072), np.uint8)}, "1 images but 2 labels"),
])
def test_a_cifar_batch_naming_other_code_is_refused(tmp_path, content, expected):
    import pickle

    folder = write_cifar(tmp_path, per_batch=5, test=5)
    (folder / "data_batch_1").write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(CifarFormatError) as err:
        dataset_source("cifar", tmp_path).client_dataset(rank=0, num_clients=2, release=True)
    assert str(folder / "data_batch_1") in str(err.value) and expected in str(err.value)


def test_cifar_test_split_is_the_same_read_directly(tmp_path):
    write_cifar(tmp_path, per_batch=5, test=30)
    cfg = dataset_source("cifar", tmp_path, test_samples=20)
    direct, reference = cfg.test_dataset(release=True), cfg.test_dataset(release=False)
    assert len(direct) == len(reference) == 20
    assert all(torch.equal(direct[i][0], reference[i][0]) and direct[i][1] == reference[i][1] for i in range(20))


class _RunsAShellCommand:
    """Unpickling this calls os.system: what a hostile batch file can hide."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


def read_by(route: str, cfg):
    """Read ``cfg``'s data the way ``route`` does: the launcher's check, or a client or the server on either path."""
    return {"check_available": lambda: cfg.check_available(),
            "client_original": lambda: cfg.client_dataset(rank=0, num_clients=2, release=False),
            "client_optimized": lambda: cfg.client_dataset(rank=0, num_clients=2, release=True),
            "test_original": lambda: cfg.test_dataset(release=False),
            "test_optimized": lambda: cfg.test_dataset(release=True)}[route]()


@pytest.mark.parametrize("read", ["check_available", "client_original", "client_optimized", "test_original",
                                  "test_optimized"])
def test_a_cifar_batch_that_runs_code_is_refused_on_both_paths(tmp_path, read):
    import pickle

    folder = write_cifar(tmp_path, per_batch=5, test=5)
    marker = tmp_path / "code-ran"
    name = "test_batch" if read.startswith("test") else "data_batch_1"
    payload = {"labels": [1], "data": _RunsAShellCommand(f"touch {marker}")}
    (folder / name).write_bytes(pickle.dumps(payload, protocol=2))
    cfg = dataset_source("cifar", tmp_path)
    with pytest.raises(CifarFormatError) as err:
        read_by(read, cfg)
    message = str(err.value)
    assert str(folder / name) in message and "system, which a CIFAR-10 batch file does not" in message
    assert not marker.exists()


@pytest.mark.parametrize("damage, expected", [
    ("garbage", "not a CIFAR-10 batch file"),
    ("truncated", "truncated"),
    ("foreign", "expected a dict with data and labels"),
    ("empty", "not a CIFAR-10 batch file"),
])
@pytest.mark.parametrize("python2", [True, False])
def test_a_damaged_cifar_batch_is_named_on_the_original_path(tmp_path, damage, expected, python2):
    import pickle

    folder = write_cifar(tmp_path, per_batch=60, test=30, python2=python2)
    path = folder / "data_batch_3"
    path.write_bytes({"garbage": b"\x89PNG\r\n\x1a\n" + bytes(500), "truncated": path.read_bytes()[:100_000],
                      "foreign": pickle.dumps({"images": [1, 2]}, protocol=2), "empty": b""}[damage])
    with pytest.raises(CifarFormatError, match=expected) as err:
        dataset_source("cifar", tmp_path).client_dataset(rank=0, num_clients=2, release=False)
    assert str(path) in str(err.value)


def test_the_original_cifar_path_still_holds_the_whole_split_and_its_stacked_copy(tmp_path):
    import memray

    write_cifar(tmp_path, per_batch=2000, test=10)  # 6 MB per batch file, 30.7 MB of training images
    with memray.Tracker(tmp_path / "load.bin", file_format=memray.FileFormat.AGGREGATED_ALLOCATIONS):
        split = dataset_source("cifar", tmp_path).load_split(True)
    peak = memray.FileReader(str(tmp_path / "load.bin")).metadata.peak_memory
    assert split.images.shape == (10000, 3, 32, 32)
    assert peak > 1.9 * split.images.numel(), peak  # the batches and their vstack, as torchvision holds them


def rewrite_idx_labels(folder, stem, labels, gz):
    import gzip

    blob = idx_blob((len(labels),), bytes(labels))
    path = folder / (stem + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(blob) if gz else blob)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("read", ["check_available", "client_original", "client_optimized", "test_original",
                                  "test_optimized"])
def test_an_idx_label_outside_the_classes_is_named(tmp_path, gz, read):
    folder = write_idx(tmp_path / "MNIST" / "raw", train=40, test=10, gz=gz)
    train = not read.startswith("test")
    labels = [3] * (40 if train else 10)
    labels[7] = 200
    path = rewrite_idx_labels(folder, IDX_FILES[train][1], labels, gz)
    cfg = dataset_source("mnist", tmp_path)
    with pytest.raises(LabelRangeError) as err:
        read_by(read, cfg)
    message = str(err.value)
    assert str(path) in message and "label 200 (sample 7" in message
    assert "must be in 0..9 (dataset.num_classes=10)" in message


@pytest.mark.parametrize("read", ["check_available", "client_original", "client_optimized", "test_original",
                                  "test_optimized"])
@pytest.mark.parametrize("bad", [10, -1])
def test_a_cifar_label_outside_the_classes_is_named(tmp_path, read, bad):
    import pickle

    folder = write_cifar(tmp_path, per_batch=5, test=5)
    name = "test_batch" if read.startswith("test") else "data_batch_4"
    labels = [0, 1, bad, 3, 4]
    (folder / name).write_bytes(pickle.dumps({"labels": labels, "data": np.zeros((5, 3072), np.uint8)}, protocol=2))
    cfg = dataset_source("cifar", tmp_path)
    with pytest.raises(LabelRangeError) as err:
        read_by(read, cfg)
    message = str(err.value)
    assert str(folder / name) in message and f"label {bad} (sample 2" in message and "0..9" in message


@pytest.mark.parametrize("name", ["cifar", "mnist"])
def test_a_failed_download_leaves_no_folders_at_a_mistyped_root(tmp_path, monkeypatch, free_port, name):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):  # no network: a closed local port
        monkeypatch.setenv(var, f"http://127.0.0.1:{free_port}")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "kept").mkdir()  # a folder that existed before stays, even empty
    root = tmp_path / "kept" / "mistyped" / "xyz"
    with pytest.raises(DatasetNotFoundError, match="failed"):
        dataset_source(name, root, download=True).check_available()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]
