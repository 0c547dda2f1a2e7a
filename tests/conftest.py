"""Shared fixtures: real on-disk datasets in miniature, free ports, and a way to run launch.py for real."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# Small, fast jobs: what the tests need from a run is its mechanics and its files, not accuracy.
TINY = ["rounds=2", "local_steps=2", "batch_size=16", "dataset.samples_per_client=48", "dataset.test_samples=64",
        "profiling.memory_interval_ms=5"]


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Python2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2's cPickle did its strings (BINSTRING), as in the published CIFAR-10 files."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def write_cifar(root: Path, per_batch: int = 40, test: int = 40, seed: int = 0, python2: bool = True) -> Path:
    """CIFAR-10 in torchvision's python layout (``root/cifar-10-batches-py``), with few images.

    ``python2``: the image bytes lie raw in the file, as in the published files (Python 2 pickles);
    False: as Python 3 writes protocol 2 (a latin-1 text string re-encoded when loaded).
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name, n):
        batch = {"batch_label": name, "labels": rng.integers(0, 10, n).tolist(),
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as fh:
            (_Python2Pickler(fh, protocol=2).dump if python2 else pickle.Pickler(fh, protocol=2).dump)(batch)

    for i in range(1, 6):
        dump(f"data_batch_{i}", per_batch)
    dump("test_batch", test)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [str(i) for i in range(10)], "num_vis": 3072}, fh, protocol=2)
    return folder


def write_idx(folder: Path, train: int = 200, test: int = 64, gz: bool = True, seed: int = 0) -> Path:
    """MNIST-style IDX files (big-endian header, uint8 payload) in ``folder``, gzipped or plain."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def dump(stem, array):
        dims = array.shape
        blob = struct.pack(">I", 0x0800 + len(dims)) + struct.pack(f">{len(dims)}I", *dims) + array.tobytes()
        if gz:
            with gzip.open(folder / f"{stem}.gz", "wb") as fh:
                fh.write(blob)
        else:
            (folder / stem).write_bytes(blob)

    for prefix, n in (("train", train), ("t10k", test)):
        dump(f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        dump(f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    return folder


def dataset_source(name: str, root, **keys):
    """The data source ``conf/dataset/NAME.yaml`` builds (``hydra.utils.instantiate``), reading ``root``
    without downloading, uncut (no ``samples_per_client``/``test_samples``), seed 0, generated splits of
    256/64 samples, then ``keys`` on top."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    yaml = OmegaConf.load(CONF / "dataset" / f"{name}.yaml")
    base = {"root": str(root), "download": False, "samples_per_client": None, "test_samples": None, "seed": 0}
    if "train_size" in yaml:
        base.update(train_size=256, test_size=64)
    return instantiate(OmegaConf.merge(yaml, base, keys))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A data root holding tiny CIFAR-10 (python batches) and MNIST (gzipped IDX) in torchvision's layout."""
    root = tmp_path_factory.mktemp("data")
    write_cifar(root)
    write_idx(root / "MNIST" / "raw", gz=True)
    return root


def launch(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python launch.py ARGS`` in ``cwd`` (its outputs/ lands there) as a user would."""
    full_env = dict(os.environ, **(env or {}), COLUMNS="200")
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def job_dirs(cwd: Path) -> list[Path]:
    """Every job directory (one with config.yaml or result.json) under ``cwd/outputs``, in job order."""
    found = {p.parent for p in (cwd / "outputs").rglob("result.json")}
    return sorted(found, key=lambda p: (str(p.parent), int(p.name) if p.name.isdigit() else 0))


def result(job_dir: Path) -> dict:
    return json.loads((job_dir / "result.json").read_text())


def run_rounds(fl, threads, server=None) -> list[dict]:
    """Start the client ``threads``, run ``fl`` (a RoundServer) to the end, join them (60 s each), and stop the
    gRPC ``server`` if given; returns the server's round records. A server failure is recorded first, as the
    worker does, so that waiting clients hear why."""
    for t in threads:
        t.start()
    try:
        return fl.run()
    except BaseException as exc:
        fl.record_error(exc)
        raise
    finally:
        for t in threads:
            t.join(60)
        if server is not None:
            server.stop(0)
