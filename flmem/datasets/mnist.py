"""``dataset=mnist`` and ``dataset=fashion_mnist``: IDX files in torchvision's layout, gzipped or not.

``ROOT/MNIST/raw`` or ``ROOT/FashionMNIST/raw``; ``fashion_mnist`` also finds Debian's
``dataset-fashion-mnist`` package in ``/usr/share/datasets/fashion-mnist``. Headers are checked by
flmem.idx before any sample is read; the original path reads whole files with torchvision's IDX
reader, the released one only the kept rows.
"""
from __future__ import annotations

import gzip
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flmem.datasets.base import DatasetNotFoundError, ImageSource
from flmem.datasets.download import download, fix
from flmem.idx import IdxFormatError, IdxHeader, read_all, read_header, read_rows

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find_idx(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_idx(path: Path, reader):
    if path.suffix != ".gz":
        return reader(str(path))
    # torchvision's IDX reader takes a plain file: unpack to a private temporary one.
    with tempfile.TemporaryDirectory(prefix="flmem-idx-") as tmp:
        plain = Path(tmp) / path.stem
        with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return reader(str(plain))


@dataclass(kw_only=True)
class IdxImages(ImageSource):
    """Four IDX files (train/test images and labels) in ``root/<subfolder>/raw`` or ``extra_folders``."""
    subfolder = "MNIST"                   # torchvision's folder under root (class attributes, not yaml keys)
    torchvision_class = "MNIST"           # the torchvision.datasets class that downloads the files
    extra_folders = ()                    # where else to look, after root
    install_hint = ""                     # appended to the fix when files are missing

    def idx_folders(self) -> list[Path]:
        """Where the IDX files are looked for, in order."""
        return [Path(self.root).expanduser() / self.subfolder / "raw", *self.extra_folders]

    def ensure(self) -> dict[str, IdxHeader]:
        """The four IDX files' checked headers, by stem (downloading them first when allowed and missing)."""
        folders = self.idx_folders()
        stems = IDX_FILES[True] + IDX_FILES[False]
        failure = None
        if any(_find_idx(folders, s) is None for s in stems) and self.download:
            failure = download(self._fetch, folders[:1])
        found = {s: _find_idx(folders, s) for s in stems}
        missing = [s for s, p in found.items() if p is None]
        if missing:
            raise DatasetNotFoundError(
                f"dataset={self.name}: no {', '.join(missing)} (plain or .gz) in {' or '.join(map(str, folders))}. "
                + fix(failure, f"put the files in {folders[0]}{self.install_hint}, or point dataset.root at the "
                               f"folder that holds {folders[0].parent.name}/raw"))
        headers = {s: read_header(p, 3 if "images" in s else 1) for s, p in found.items()}
        for images, labels in IDX_FILES.values():
            if headers[images].count != headers[labels].count:
                raise IdxFormatError(f"dataset={self.name}: {headers[images].path} holds {headers[images].count} "
                                     f"images but {headers[labels].path} holds {headers[labels].count} labels; "
                                     f"they must come from the same split")
        return headers

    def _fetch(self) -> None:
        import torchvision

        cls = getattr(torchvision.datasets, self.torchvision_class)
        cls(str(Path(self.root).expanduser()), train=False, download=True)

    def check_available(self) -> None:
        """Checks the IDX headers and every label against ``num_classes``; reads no image."""
        headers = self.ensure()
        for _, stem in IDX_FILES.values():
            self.checked_labels(read_all(headers[stem]), headers[stem].path)

    def load_split(self, train: bool):
        """The whole split, read by torchvision's IDX reader (a .gz unpacked to a temporary file first)."""
        import torch
        from torchvision.datasets.mnist import read_image_file, read_label_file

        from flmem.datasets.split import SplitData

        headers = self.ensure()
        image_stem, label_stem = IDX_FILES[train]
        images = _read_idx(headers[image_stem].path, read_image_file).unsqueeze(1)  # [N, 1, 28, 28]
        path = headers[label_stem].path
        labels = torch.from_numpy(self.checked_labels(_read_idx(path, read_label_file).numpy(), path))
        return self.checked_shape(SplitData(images.contiguous(), labels))

    def rows(self, train: bool, rows=None, rank: int = 0, num_clients: int = 1):
        """Some samples of a split without reading the others: ``rows`` (indices), or when None client
        ``rank``'s partition, computed from the labels file (read whole: one byte per sample)."""
        import torch

        from flmem.datasets.split import SplitData

        headers = self.ensure()
        image_stem, label_stem = IDX_FILES[train]
        labels = torch.from_numpy(self.checked_labels(read_all(headers[label_stem]), headers[label_stem].path))
        if rows is None:
            rows = self.client_indices(labels, rank, num_clients)
        images = torch.from_numpy(read_rows(headers[image_stem], rows)).unsqueeze(1)
        return self.checked_shape(SplitData(images, labels[torch.from_numpy(np.asarray(rows, dtype=np.int64))].clone()))

    def client_split(self, rank: int, num_clients: int):
        """Removes the whole training split (and the unpacked copy of a .gz): labels first, then one pass
        over the images keeping this client's rows."""
        return self.rows(True, rank=rank, num_clients=num_clients)

    def test_rows(self):
        """Removes the rest of the test split: only the evaluated samples are read."""
        n = self.ensure()[IDX_FILES[False][0]].count
        return self.rows(False, np.arange(n if self.test_samples is None else min(n, int(self.test_samples))))


@dataclass(kw_only=True)
class MNIST(IdxImages):
    """MNIST in ``root/MNIST/raw``."""


@dataclass(kw_only=True)
class FashionMNIST(IdxImages):
    """Fashion-MNIST in ``root/FashionMNIST/raw``, else Debian's dataset-fashion-mnist package."""
    subfolder = "FashionMNIST"
    torchvision_class = "FashionMNIST"
    extra_folders = (DEBIAN_FASHION_MNIST,)
    install_hint = " or install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"
