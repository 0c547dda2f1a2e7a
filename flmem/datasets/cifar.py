"""``dataset=cifar``: CIFAR-10 in torchvision's python layout, ``ROOT/cifar-10-batches-py``.

Every batch file is read through flmem.cifar's restricted unpickler, never ``pickle.load`` (which runs
any code a file names). torchvision serves only the download (archive md5-checked, then unpacked).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flmem.cifar import open_batch, read_batch
from flmem.datasets.base import DatasetNotFoundError, ImageSource
from flmem.datasets.download import download, fix

CIFAR_FILES = {True: [f"data_batch_{i}" for i in range(1, 6)], False: ["test_batch"]}


def _fetch_cifar(root: Path) -> None:
    """torchvision's CIFAR-10 download (archive md5-checked, then unpacked), without its reader:
    torchvision would ``pickle.load`` the batch files, which runs any code a file names."""
    import torchvision
    from torchvision.datasets.utils import download_and_extract_archive

    tv = torchvision.datasets.CIFAR10
    download_and_extract_archive(tv.url, str(root), filename=tv.filename, md5=tv.tgz_md5)


@dataclass(kw_only=True)
class CIFAR10(ImageSource):
    """CIFAR-10's five training batch files and its test batch, in ``root/cifar-10-batches-py``."""

    @property
    def folder(self) -> Path:
        return Path(self.root).expanduser() / "cifar-10-batches-py"

    def ensure(self) -> Path:
        """The batch files' folder, downloading them first when allowed and missing; DatasetNotFoundError
        naming the folder, the missing files and the fix."""
        folder = self.folder
        missing = [f for f in CIFAR_FILES[True] + CIFAR_FILES[False] if not (folder / f).is_file()]
        failure = None
        if missing and self.download:
            root = Path(self.root).expanduser()
            failure = download(lambda: _fetch_cifar(root), [folder])
            missing = [f for f in missing if not (folder / f).is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"dataset=cifar: {folder} lacks {', '.join(missing)}. Expected CIFAR-10 in torchvision's python "
                f"layout (data_batch_1..5, test_batch). "
                + fix(failure, f"put cifar-10-python.tar.gz's files in {folder}, or point dataset.root at the folder "
                               f"that holds cifar-10-batches-py"))
        return folder

    def check_available(self) -> None:
        """Unpickles each batch file with flmem.cifar's restricted unpickler (images left in the file) and
        checks every label against ``num_classes``."""
        folder = self.ensure()
        for name in CIFAR_FILES[True] + CIFAR_FILES[False]:
            self.checked_labels(open_batch(folder / name)["labels"], folder / name)

    def load_split(self, train: bool):
        """The whole split as torchvision's CIFAR10 reader holds it: every batch file read whole into a
        list, then stacked (a second copy of the split while both live), but each file is read through
        flmem.cifar's restricted unpickler instead of ``pickle.load``."""
        import torch

        from flmem.datasets.split import SplitData

        folder = self.ensure()
        arrays, targets = [], []
        for name in CIFAR_FILES[train]:
            array, labels = read_batch(folder / name)
            arrays.append(array)
            targets.extend(self.checked_labels(labels, folder / name).tolist())
        hwc = np.vstack(arrays).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # torchvision's layout
        images = torch.from_numpy(np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)))
        return self.checked_shape(SplitData(images, torch.tensor(targets, dtype=torch.int64)))

    def client_split(self, rank: int, num_clients: int):
        """Removes the whole training split and torchvision's second copy of it (its vstack): every batch
        file's labels (its images left in the file), which the partition needs, then only this client's
        rows of each file."""
        import torch

        from flmem.datasets.split import SplitData

        folder = self.ensure()
        batches = [open_batch(folder / name) for name in CIFAR_FILES[True]]
        all_labels = torch.from_numpy(np.concatenate(
            [self.checked_labels(batch["labels"], folder / name) for batch, name in zip(batches, CIFAR_FILES[True])]))
        idx = self.client_indices(all_labels, rank, num_clients)
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

    def test_rows(self):
        """Removes the rest of the test split and torchvision's second copy of it (its vstack): only the
        evaluated rows of the test batch are read."""
        import torch

        from flmem.datasets.split import SplitData

        path = self.ensure() / CIFAR_FILES[False][0]
        entry = open_batch(path)
        labels = torch.from_numpy(self.checked_labels(entry["labels"], path))
        n = len(labels) if self.test_samples is None else min(len(labels), int(self.test_samples))
        images = torch.from_numpy(entry["data"].rows(np.arange(n))).view(-1, 3, 32, 32)
        return SplitData(images, labels[:n].clone())
