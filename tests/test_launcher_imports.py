"""The launcher validates a config and checks the data without importing torch or torchvision.

Only the role processes train, so the launcher (one per job, alive for the whole job) must not pay
torch's import time and resident memory: each check runs in a fresh interpreter, as a user's launch does.
"""
import os
import subprocess
import sys

from tests.conftest import CONF, REPO, write_cifar, write_idx

HEAVY = ("torch", "torchvision")

# The launcher's prepare path (flmem.launcher.Job.prepare: validate with the reference config, build the data
# source, check its files, write config.yaml) for every dataset, then one client's data as a role loads it.
PREPARE = r"""
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from flmem.datasets import DatasetNotFoundError
from flmem.launcher import Job, dataset_source

root, out, conf = map(Path, sys.argv[1:4])
for name in ("synthetic", "cifar", "mnist", "fashion_mnist", "tokens", "missing"):
    overrides = [f"dataset={'mnist' if name == 'missing' else name}", "dataset.download=false",
                 f"dataset.root={root / 'empty' if name == 'missing' else root}"]
    overrides += ["model=transformer"] if name == "tokens" else []
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
        try:
            written = Job(cfg, out / name, overrides).prepare()
            print(name, "prepared", written.is_file())
        except DatasetNotFoundError as exc:
            print(name, "refused", "no train-images-idx3-ubyte" in str(exc))
print("after prepare:", ",".join(m for m in ("torch", "torchvision") if m in sys.modules) or "-")
with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
    cfg = compose("config", overrides=["dataset=mnist", f"dataset.root={root}", "dataset.samples_per_client=8"])
samples = dataset_source(cfg.dataset).client_dataset(0, 2, release=False)
print("after a client's data:", ",".join(m for m in ("torch", "torchvision") if m in sys.modules), len(samples))
"""


def run(args, cwd, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          **kw)


def test_prepare_validates_and_checks_every_dataset_without_torch(tmp_path):
    root = tmp_path / "data"
    write_cifar(root, per_batch=8, test=8)
    write_idx(root / "MNIST" / "raw", train=20, test=8, gz=True)
    write_idx(root / "FashionMNIST" / "raw", train=20, test=8, gz=False)
    done = run(["-c", PREPARE, str(root), str(tmp_path / "jobs"), str(CONF)], tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:6] == [f"{name} prepared True" for name in ("synthetic", "cifar", "mnist", "fashion_mnist", "tokens")
                         ] + ["missing refused True"]
    assert lines[6] == "after prepare: -"
    # The same interpreter sees torch once a role's loading runs: the check above can fail.
    assert lines[7] == "after a client's data: torch,torchvision 8"


def imported_modules(stderr: str) -> set[str]:
    """Top-level package names from ``python -X importtime``'s report (``import time: self | cumulative | name``)."""
    return {line.rpartition("|")[2].strip().split(".")[0] for line in stderr.splitlines()
            if line.startswith("import time:")}


def test_launch_py_cfg_and_help_import_no_torch(tmp_path):
    runs = {"--cfg job": "_target_: torch.optim.SGD",
            "--cfg job dataset=cifar optimizer=adam lr=0.001": "_target_: torch.optim.Adam",
            "--help": "optimizer: adam, sgd"}
    for args, shown in runs.items():
        done = run(["-X", "importtime", str(REPO / "launch.py"), *args.split()], tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert shown in done.stdout
        modules = imported_modules(done.stderr)
        assert "hydra" in modules and "omegaconf" in modules  # the report lists what was imported
        assert not modules & set(HEAVY), (args, modules & set(HEAVY))
