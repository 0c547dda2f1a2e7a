"""Datasets and their partition across clients.

Images are held as ``uint8`` tensors ``[N, C, H, W]`` with ``int64`` labels ``[N]`` and
normalized per sample when read. Sources:

* ``tokens``: synthetic token sequences for the decoder-only language model (flmem.synthetic).
* ``synthetic``: CIFAR-shaped (3x32x32, 10 classes) images made from a seed (flmem.synthetic).
* ``cifar``: CIFAR-10 in torchvision's layout, ``ROOT/cifar-10-batches-py``.
* ``mnist`` / ``fashion_mnist``: IDX files in torchvision's layout, ``ROOT/MNIST/raw`` or
  ``ROOT/FashionMNIST/raw``, gzipped or not; ``fashion_mnist`` also finds Debian's
  ``dataset-fashion-mnist`` package in ``/usr/share/datasets/fashion-mnist``.

Loading never checks torchvision's md5 sums, so re-encoded copies load too. On the optimized
path (``optimization.release``) a role reads or makes only the samples it keeps.
"""
from __future__ import annotations

import gzip
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import download_and_extract_archive

from flmem import synthetic
from flmem.cifar import CifarFormatError, open_batch, read_batch
from flmem.idx import IdxFormatError, IdxHeader, read_all, read_header, read_rows

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR_FILES = {True: [f"data_batch_{i}" for i in range(1, 6)], False: ["test_batch"]}
DOWNLOAD_TIMEOUT_S = 20.0  # seconds one socket operation of a download may block


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where the config says, and were not downloaded."""


@dataclass
class SplitData:
    images: torch.Tensor  # uint8 images [N, C, H, W], or int64 token ids [N, T]
    labels: torch.Tensor  # int64 [N] classes, or int64 [N, T] next tokens


class SplitDataset(torch.utils.data.Dataset):
    """``(input, label)`` pairs: ``uint8`` images scaled to [-1, 1] as ``float32``, token ids as they are."""

    def __init__(self, data: SplitData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data.labels)

    def __getitem__(self, i):
        x = self.data.images[i]
        return (x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x), self.data.labels[i]


# ------------------------------------------------------------------ sources
def _fetch_cifar(root: Path) -> None:
    """torchvision's CIFAR-10 download (archive md5-checked, then unpacked), without its reader:
    torchvision would ``pickle.load`` the batch files, which runs any code a file names."""
    tv = torchvision.datasets.CIFAR10
    download_and_extract_archive(tv.url, str(root), filename=tv.filename, md5=tv.tgz_md5)


def _ensure_cifar(cfg) -> Path:
    root = Path(cfg.root).expanduser()
    folder = root / "cifar-10-batches-py"
    missing = [f for f in CIFAR_FILES[True] + CIFAR_FILES[False] if not (folder / f).is_file()]
    failure = None
    if missing and cfg.download:
        failure = _download(lambda: _fetch_cifar(root), [folder])
        missing = [f for f in missing if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"dataset=cifar: {folder} lacks {', '.join(missing)}. Expected CIFAR-10 in torchvision's python "
            f"layout (data_batch_1..5, test_batch). "
            + _fix(failure, f"put cifar-10-python.tar.gz's files in {folder}, or point dataset.root at the folder "
                            f"that holds cifar-10-batches-py"))
    return root


def _cifar(cfg, train: bool) -> SplitData:
    """The whole split as torchvision's CIFAR10 reader holds it: every batch file read whole into a
    list, then stacked (a second copy of the split while both live), but each file is read through
    flmem.cifar's restricted unpickler instead of ``pickle.load``."""
    folder = _ensure_cifar(cfg) / "cifar-10-batches-py"
    arrays, targets = [], []
    for name in CIFAR_FILES[train]:
        array, labels = read_batch(folder / name)
        arrays.append(array)
        targets.extend(checked_labels(cfg, labels, folder / name).tolist())
    hwc = np.vstack(arrays).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # torchvision's layout
    images = torch.from_numpy(np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)))
    return SplitData(images, torch.tensor(targets, dtype=torch.int64))


class LabelRangeError(ValueError):
    """A labels file holds a value that is not a class index of the dataset."""


def checked_labels(cfg, labels, path: Path) -> np.ndarray:
    """``labels`` (a list or array of N values) as ``int64`` ``[N]``, each in ``0..dataset.num_classes-1``.

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
    n = int(cfg.num_classes)
    bad = np.flatnonzero((values < 0) | (values >= n))
    if len(bad):
        raise LabelRangeError(
            f"{path}: label {int(values[bad[0]])} (sample {int(bad[0])}, {len(bad)} such) is not a class index: "
            f"labels must be in 0..{n - 1} (dataset.num_classes={n}); replace the file with the dataset's, "
            f"or set dataset.num_classes to the number of classes the files hold")
    return values


def _cifar_client(cfg, rank: int, num_clients: int) -> SplitData:
    """Client ``rank``'s CIFAR-10 training samples: every batch file's labels (its images left in the
    file), which the partition needs, then only this client's rows of each file."""
    folder = _ensure_cifar(cfg) / "cifar-10-batches-py"
    batches = [open_batch(folder / name) for name in CIFAR_FILES[True]]
    all_labels = torch.from_numpy(np.concatenate(
        [checked_labels(cfg, batch["labels"], folder / name) for batch, name in zip(batches, CIFAR_FILES[True])]))
    idx = client_indices(cfg, all_labels, rank, num_clients)
    images = torch.empty(len(idx), 3, 32, 32, dtype=torch.uint8)
    start = 0
    for batch in batches:
        count = batch["data"].shape[0]
        inside = (idx >= start) & (idx < start + count)
        if inside.any():
            rows = batch["data"].rows(idx[inside] - start)  # [R, 3072] in the file's CHW order
            images[torch.from_numpy(inside)] = torch.from_numpy(rows).view(-1, 3, 32, 32)
        start += count
    return SplitData(images, all_labels[torch.from_numpy(idx)].clone())


def idx_folders(cfg) -> list[Path]:
    """Where the IDX files of ``cfg.name`` are looked for, in order."""
    sub = "MNIST" if cfg.name == "mnist" else "FashionMNIST"
    folders = [Path(cfg.root).expanduser() / sub / "raw"]
    if cfg.name == "fashion_mnist":
        folders.append(DEBIAN_FASHION_MNIST)
    return folders


def _find_idx(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_idx(path: Path, reader) -> torch.Tensor:
    if path.suffix != ".gz":
        return reader(str(path))
    # torchvision's IDX reader takes a plain file: unpack to a private temporary one.
    with tempfile.TemporaryDirectory(prefix="flmem-idx-") as tmp:
        plain = Path(tmp) / path.stem
        with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return reader(str(plain))


def _ensure_idx(cfg) -> dict[str, IdxHeader]:
    """The four IDX files' checked headers, by stem (downloading them first when allowed and missing)."""
    folders = idx_folders(cfg)
    stems = IDX_FILES[True] + IDX_FILES[False]
    failure = None
    if any(_find_idx(folders, s) is None for s in stems) and cfg.download:
        cls = torchvision.datasets.MNIST if cfg.name == "mnist" else torchvision.datasets.FashionMNIST
        failure = _download(lambda: cls(str(Path(cfg.root).expanduser()), train=False, download=True), folders[:1])
    found = {s: _find_idx(folders, s) for s in stems}
    missing = [s for s, p in found.items() if p is None]
    if missing:
        hint = " or install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)" \
            if cfg.name == "fashion_mnist" else ""
        raise DatasetNotFoundError(
            f"dataset={cfg.name}: no {', '.join(missing)} (plain or .gz) in {' or '.join(map(str, folders))}. "
            + _fix(failure, f"put the files in {folders[0]}{hint}, or point dataset.root at the folder that "
                            f"holds {folders[0].parent.name}/raw"))
    headers = {s: read_header(p, 3 if "images" in s else 1) for s, p in found.items()}
    for images, labels in IDX_FILES.values():
        if headers[images].count != headers[labels].count:
            raise IdxFormatError(f"dataset={cfg.name}: {headers[images].path} holds {headers[images].count} images "
                                 f"but {headers[labels].path} holds {headers[labels].count} labels; "
                                 f"they must come from the same split")
    return headers


def _idx(cfg, train: bool) -> SplitData:
    headers = _ensure_idx(cfg)
    image_stem, label_stem = IDX_FILES[train]
    images = _read_idx(headers[image_stem].path, read_image_file).unsqueeze(1)  # [N, 1, 28, 28]
    path = headers[label_stem].path
    labels = torch.from_numpy(checked_labels(cfg, _read_idx(path, read_label_file).numpy(), path))
    return SplitData(images.contiguous(), labels)


def _idx_rows(cfg, train: bool, rows=None, rank: int = 0, num_clients: int = 1) -> SplitData:
    """Some samples of an IDX split without reading the others: ``rows`` (indices), or when None
    client ``rank``'s partition, computed from the labels file (read whole: one byte per sample)."""
    headers = _ensure_idx(cfg)
    image_stem, label_stem = IDX_FILES[train]
    labels = torch.from_numpy(checked_labels(cfg, read_all(headers[label_stem]), headers[label_stem].path))
    if rows is None:
        rows = client_indices(cfg, labels, rank, num_clients)
    images = torch.from_numpy(read_rows(headers[image_stem], rows)).unsqueeze(1)
    return _checked(cfg, SplitData(images, labels[torch.from_numpy(np.asarray(rows, dtype=np.int64))].clone()))


def _download(fetch, folders: list[Path]) -> str | None:
    """Run torchvision's download into ``folders`` (where its files go); the reason it failed, or None.

    Every socket operation gives up after ``DOWNLOAD_TIMEOUT_S`` seconds, so a network that drops
    packets fails in bounded time instead of hanging on the operating system's TCP timeouts. After
    a failure, the folders the attempt made (torchvision makes them before it downloads) are
    removed when empty, so a mistyped ``dataset.root`` leaves nothing behind.
    """
    made = [p for folder in folders for p in (folder, *folder.parents) if not p.exists()]
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        fetch()
    except Exception as exc:  # torchvision raises URLError, RuntimeError, OSError... keep the cause visible
        for path in sorted(set(made), key=lambda p: len(p.parts), reverse=True):  # deepest first
            try:
                path.rmdir()  # only an empty folder: a partial download stays for the user to see
            except OSError:
                pass
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    finally:
        socket.setdefaulttimeout(previous)
    return None


def _fix(failure: str | None, by_hand: str) -> str:
    if failure is None:
        return f"Get them with dataset.download=true (needs the network), or {by_hand}."
    return (f"Downloading them through torchvision failed ({failure}). Without the network, {by_hand}; "
            f"dataset.download=false skips the download.")


SOURCES = {"synthetic": lambda cfg, train: SplitData(*synthetic.split(cfg, train)), "cifar": _cifar, "mnist": _idx,
           "fashion_mnist": _idx, "tokens": lambda cfg, train: SplitData(*synthetic.tokens(cfg, train))}


def load_split(cfg, train: bool) -> SplitData:
    """The whole train or test split of ``cfg.name``.

    Raises:
        DatasetNotFoundError: files missing (the message names the path, the files and the fix).
        IdxFormatError: an IDX file disagrees with its header (a ValueError).
        CifarFormatError: a CIFAR-10 batch file is not one (names other code, truncated...; a ValueError).
        LabelRangeError: a label outside ``0..dataset.num_classes-1`` (a ValueError naming the file).
        ValueError: the files' image shape differs from ``dataset.channels``/``dataset.image_size``.
    """
    return _checked(cfg, SOURCES[cfg.name](cfg, train))


def _checked(cfg, data: SplitData) -> SplitData:
    if cfg.name == "tokens":
        return data
    _, c, h, w = data.images.shape
    if (c, h, w) != (cfg.channels, cfg.image_size, cfg.image_size):
        raise ValueError(f"dataset={cfg.name}: images are {c}x{h}x{w}, but dataset.channels={cfg.channels} and "
                         f"dataset.image_size={cfg.image_size}; fix those keys in conf/dataset/{cfg.name}.yaml")
    return data


def check_available(cfg) -> None:
    """Make sure the dataset's files exist, downloading them first when ``dataset.download=true``.

    The launcher calls this once, before any process starts, so roles never download concurrently.
    Reads no images: checks the IDX headers, unpickles each CIFAR-10 batch with flmem.cifar's
    restricted unpickler (images left in the file), and checks every label against
    ``dataset.num_classes``. Raises DatasetNotFoundError naming the folder, the missing files and
    the fix, IdxFormatError or CifarFormatError naming a file that is not what it should be, or
    LabelRangeError naming a file with a label outside ``0..dataset.num_classes-1``.
    """
    if cfg.name == "cifar":
        folder = _ensure_cifar(cfg) / "cifar-10-batches-py"
        for name in CIFAR_FILES[True] + CIFAR_FILES[False]:
            checked_labels(cfg, open_batch(folder / name)["labels"], folder / name)
    elif cfg.name in ("mnist", "fashion_mnist"):
        headers = _ensure_idx(cfg)
        for _, stem in IDX_FILES.values():
            checked_labels(cfg, read_all(headers[stem]), headers[stem].path)


# ------------------------------------------------------------------ partition
def partition(labels: np.ndarray, num_clients: int, scheme: str, alpha: float, seed: int) -> list[np.ndarray]:
    """Split sample indices across clients.

    ``iid``: a seeded shuffle cut into equal parts. ``dirichlet``: for each class, proportions
    drawn from Dir(alpha) over clients (Hsu et al., 2019, "Measuring the Effects of Non-Identical
    Data Distribution for Federated Visual Classification"); smaller alpha, more skew.
    Returns one index array per client, each shuffled.
    """
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)[:-1]
        for k, piece in enumerate(np.split(idx, cuts)):
            parts[k].extend(piece.tolist())
    return [rng.permutation(np.asarray(p, dtype=np.int64)) for p in parts]


def client_indices(cfg, labels: torch.Tensor, rank: int, num_clients: int) -> np.ndarray:
    classes = labels if labels.dim() == 1 else labels[:, 0]  # token data: the first target stands for the class
    parts = partition(classes.numpy(), num_clients, cfg.partition, cfg.alpha, int(cfg.seed))
    mine = parts[rank]
    if cfg.samples_per_client is not None:
        mine = mine[: int(cfg.samples_per_client)]
    if len(mine) == 0:
        raise ValueError(f"client {rank} got no samples (dataset.partition={cfg.partition}, "
                         f"dataset.alpha={cfg.alpha}); raise dataset.alpha or lower num_clients")
    return mine


def client_dataset(cfg, rank: int, num_clients: int, release: bool) -> torch.utils.data.Dataset:
    """Client ``rank``'s training samples.

    Original path: a ``Subset`` over the whole split, which keeps every client's images alive.
    Optimized (``release``): reads or makes only the client's own samples (``tokens``: copies them
    out of the whole split and drops it). Both paths give the same samples in the same order.

    Raises DatasetNotFoundError (files missing), IdxFormatError, CifarFormatError or LabelRangeError (a file that
    is not what its dataset holds; both ValueError), ValueError (shape differs from the config).
    """
    if release and cfg.name == "cifar":
        # Removes the whole training split and torchvision's second copy of it (its vstack): only this
        # client's images are read.
        return SplitDataset(_cifar_client(cfg, rank, num_clients))
    if release and cfg.name in ("mnist", "fashion_mnist"):
        # Removes the whole training split (and the unpacked copy of a .gz): labels first, then one pass
        # over the images keeping this client's rows.
        return SplitDataset(_idx_rows(cfg, True, rank=rank, num_clients=num_clients))
    if release and cfg.name == "synthetic":
        # Removes the whole training split: the noise is still drawn for every sample, in order, but
        # only this client's images are made and kept.
        labels = synthetic.prepare(cfg, True)[2]
        mine = client_indices(cfg, labels, rank, num_clients)
        return SplitDataset(SplitData(*synthetic.samples(cfg, True, mine)))
    full = load_split(cfg, train=True)
    idx = client_indices(cfg, full.labels, rank, num_clients)
    if not release:
        return torch.utils.data.Subset(SplitDataset(full), idx.tolist())
    index = torch.from_numpy(idx)
    # Removes the whole training split: only this client's samples stay in memory.
    own = SplitData(full.images[index].clone(), full.labels[index].clone())
    del full
    return SplitDataset(own)


def test_dataset(cfg, release: bool = False) -> torch.utils.data.Dataset:
    """The first ``dataset.test_samples`` samples of the test split (all when null).

    With ``release`` only those samples are read (IDX, CIFAR-10: not through torchvision's readers)
    or made (synthetic). Both paths give the same samples.
    """
    if release and cfg.name == "cifar":
        # Removes the rest of the test split and torchvision's second copy of it (its vstack).
        path = _ensure_cifar(cfg) / "cifar-10-batches-py" / CIFAR_FILES[False][0]
        entry = open_batch(path)
        labels = torch.from_numpy(checked_labels(cfg, entry["labels"], path))
        n = len(labels) if cfg.test_samples is None else min(len(labels), int(cfg.test_samples))
        images = torch.from_numpy(entry["data"].rows(np.arange(n))).view(-1, 3, 32, 32)
        return SplitDataset(SplitData(images, labels[:n].clone()))
    if release and cfg.name in ("mnist", "fashion_mnist", "synthetic"):
        # Removes the rest of the test split: only the evaluated samples are read or made.
        n = int(cfg.test_size) if cfg.name == "synthetic" else _ensure_idx(cfg)[IDX_FILES[False][0]].count
        rows = np.arange(n if cfg.test_samples is None else min(n, int(cfg.test_samples)))
        if cfg.name == "synthetic":
            return SplitDataset(SplitData(*synthetic.samples(cfg, False, rows)))
        return SplitDataset(_idx_rows(cfg, False, rows))
    data = load_split(cfg, train=False)
    if cfg.test_samples is not None:
        n = int(cfg.test_samples)
        data = SplitData(data.images[:n].clone(), data.labels[:n].clone())
    return SplitDataset(data)
