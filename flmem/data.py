"""Datasets and their partition across clients.

Images are held as ``uint8`` tensors ``[N, C, H, W]`` with ``int64`` labels ``[N]`` and
normalized per sample when read. Sources:

* ``tokens``: synthetic token sequences for the decoder-only language model.
* ``synthetic``: CIFAR-shaped (3x32x32, 10 classes) images made from a seed: a smooth
  per-class pattern plus noise, so a model can learn it. No files, no download.
* ``cifar``: CIFAR-10 in torchvision's layout, ``ROOT/cifar-10-batches-py``.
* ``mnist`` / ``fashion_mnist``: IDX files in torchvision's layout, ``ROOT/MNIST/raw`` or
  ``ROOT/FashionMNIST/raw``, gzipped or not; ``fashion_mnist`` also finds Debian's
  ``dataset-fashion-mnist`` package in ``/usr/share/datasets/fashion-mnist``.

Loading never checks torchvision's md5 sums, so re-encoded copies load too.
"""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.datasets.mnist import read_image_file, read_label_file

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR_FILES = {True: [f"data_batch_{i}" for i in range(1, 6)], False: ["test_batch"]}


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
def _synthetic(cfg, train: bool, block: int = 256) -> SplitData:
    n = cfg.train_size if train else cfg.test_size
    gen = torch.Generator().manual_seed(int(cfg.seed) * 2 + (0 if train else 1))
    proto_gen = torch.Generator().manual_seed(int(cfg.seed))  # same class patterns in both splits
    c, s, k = cfg.channels, cfg.image_size, cfg.num_classes
    coarse = torch.rand(k, c, 4, 4, generator=proto_gen)
    patterns = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    labels = torch.randint(0, k, (n,), generator=gen)
    images = torch.empty(n, c, s, s, dtype=torch.uint8)
    for start in range(0, n, block):  # in blocks: float temporaries stay small next to the uint8 result
        stop = min(n, start + block)
        noise = torch.rand(stop - start, c, s, s, generator=gen)
        images[start:stop] = (0.25 * patterns[labels[start:stop]] + 0.75 * noise).mul_(255).round_().to(torch.uint8)
    return SplitData(images, labels)


def _tokens(cfg, train: bool) -> SplitData:
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
    return SplitData(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())


class _CIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR-10 reader with existence checks in place of md5 checks."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root, self.base_folder)
        return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        self.classes = [str(i) for i in range(10)]  # names are not needed; batches.meta may be absent
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def _ensure_cifar(cfg) -> Path:
    root = Path(cfg.root).expanduser()
    folder = root / "cifar-10-batches-py"
    missing = [f for f in CIFAR_FILES[True] + CIFAR_FILES[False] if not (folder / f).is_file()]
    if missing and cfg.download:
        _download(lambda: _CIFAR10(str(root), train=True, download=True), folder)
        missing = [f for f in missing if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"dataset=cifar: {folder} lacks {', '.join(missing)}. Expected CIFAR-10 in torchvision's python "
            f"layout (data_batch_1..5, test_batch). Get it with dataset.download=true (needs the network), "
            f"or point dataset.root at the folder that holds cifar-10-batches-py.")
    return root


def _cifar(cfg, train: bool) -> SplitData:
    ds = _CIFAR10(str(_ensure_cifar(cfg)), train=train, download=False)
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return SplitData(images, torch.tensor(ds.targets, dtype=torch.int64))


def _cifar_batch(folder: Path, name: str) -> dict:
    with open(folder / name, "rb") as fh:  # a local dataset file in torchvision's layout, read as it does
        return pickle.load(fh, encoding="latin1")


def _cifar_client(cfg, rank: int, num_clients: int) -> SplitData:
    """Client ``rank``'s CIFAR-10 training samples, read one batch file at a time (each dropped before
    the next is read): a pass for the labels, which the partition needs, then one for the images."""
    folder = _ensure_cifar(cfg) / "cifar-10-batches-py"
    labels: list[int] = []
    for name in CIFAR_FILES[True]:
        labels.extend(_cifar_batch(folder, name)["labels"])
    all_labels = torch.tensor(labels, dtype=torch.int64)
    idx = torch.from_numpy(client_indices(cfg, all_labels, rank, num_clients))
    images = torch.empty(len(idx), 3, 32, 32, dtype=torch.uint8)
    start = 0
    for name in CIFAR_FILES[True]:
        rows = torch.from_numpy(_cifar_batch(folder, name)["data"]).view(-1, 3, 32, 32)
        inside = (idx >= start) & (idx < start + len(rows))
        images[inside] = rows[idx[inside] - start]
        start += len(rows)
        del rows
    return SplitData(images, all_labels[idx].clone())


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


def _ensure_idx(cfg) -> dict[str, Path]:
    folders = idx_folders(cfg)
    stems = IDX_FILES[True] + IDX_FILES[False]
    if any(_find_idx(folders, s) is None for s in stems) and cfg.download:
        cls = torchvision.datasets.MNIST if cfg.name == "mnist" else torchvision.datasets.FashionMNIST
        _download(lambda: cls(str(Path(cfg.root).expanduser()), train=True, download=True), folders[0])
    found = {s: _find_idx(folders, s) for s in stems}
    missing = [s for s, p in found.items() if p is None]
    if missing:
        hint = " or install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)" \
            if cfg.name == "fashion_mnist" else ""
        raise DatasetNotFoundError(
            f"dataset={cfg.name}: no {', '.join(missing)} (plain or .gz) in {' or '.join(map(str, folders))}. "
            f"Get the files with dataset.download=true (needs the network){hint}, or point dataset.root at the "
            f"folder that holds {folders[0].parent.name}/raw.")
    return found


def _idx(cfg, train: bool) -> SplitData:
    found = _ensure_idx(cfg)
    image_stem, label_stem = IDX_FILES[train]
    images = _read_idx(found[image_stem], read_image_file).unsqueeze(1)  # [N, 1, 28, 28]
    return SplitData(images.contiguous(), _read_idx(found[label_stem], read_label_file).to(torch.int64))


def _download(fetch, folder: Path) -> None:
    try:
        fetch()
    except Exception as exc:  # torchvision raises URLError, RuntimeError, OSError... keep the cause visible
        raise DatasetNotFoundError(
            f"download into {folder} failed ({type(exc).__name__}: {exc}); without the network, put the files "
            f"there yourself and keep dataset.download=false") from exc


SOURCES = {"synthetic": _synthetic, "cifar": _cifar, "mnist": _idx, "fashion_mnist": _idx, "tokens": _tokens}


def load_split(cfg, train: bool) -> SplitData:
    """The whole train or test split of ``cfg.name``.

    Raises:
        DatasetNotFoundError: files missing (the message names the path, the files and the fix).
        ValueError: the files' image shape differs from ``dataset.channels``/``dataset.image_size``.
    """
    data = SOURCES[cfg.name](cfg, train)
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
    Reads no images. Raises DatasetNotFoundError naming the folder, the missing files and the fix.
    """
    if cfg.name == "cifar":
        _ensure_cifar(cfg)
    elif cfg.name in ("mnist", "fashion_mnist"):
        _ensure_idx(cfg)


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
    Optimized (``release``): copies out the client's own samples and drops the whole split.
    """
    if release and cfg.name == "cifar":
        # Removes the whole training split and torchvision's second copy of it (its vstack): one batch
        # file is in memory at a time and only this client's images are kept.
        return SplitDataset(_cifar_client(cfg, rank, num_clients))
    full = load_split(cfg, train=True)
    idx = client_indices(cfg, full.labels, rank, num_clients)
    if not release:
        return torch.utils.data.Subset(SplitDataset(full), idx.tolist())
    index = torch.from_numpy(idx)
    # Removes the whole training split: only this client's images stay in memory.
    own = SplitData(full.images[index].clone(), full.labels[index].clone())
    del full
    return SplitDataset(own)


def test_dataset(cfg, release: bool = False) -> torch.utils.data.Dataset:
    """The first ``dataset.test_samples`` samples of the test split (all when null).

    With ``release``, CIFAR-10's test file is read directly instead of through torchvision's reader.
    """
    if release and cfg.name == "cifar":
        # Removes torchvision's second copy of the test split (its vstack).
        entry = _cifar_batch(_ensure_cifar(cfg) / "cifar-10-batches-py", CIFAR_FILES[False][0])
        n = len(entry["labels"]) if cfg.test_samples is None else int(cfg.test_samples)
        images = torch.from_numpy(entry["data"][:n]).view(-1, 3, 32, 32).clone()
        return SplitDataset(SplitData(images, torch.tensor(entry["labels"][:n], dtype=torch.int64)))
    data = load_split(cfg, train=False)
    if cfg.test_samples is not None:
        n = int(cfg.test_samples)
        data = SplitData(data.images[:n].clone(), data.labels[:n].clone())
    return SplitDataset(data)
