"""Which training samples each client holds: IID or Dirichlet label skew (numpy only)."""
from __future__ import annotations

import numpy as np


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


def client_indices(source, labels, rank: int, num_clients: int) -> np.ndarray:
    """Client ``rank``'s sample indices ([R] ``int64``) under ``source``'s ``partition``, ``alpha``, ``seed``,
    cut to ``samples_per_client``. ``labels``: ``[N]`` classes, or ``[N, T]`` next tokens (the first target
    stands for the class), as a numpy array or a CPU tensor.

    Raises ValueError when the client gets no sample, naming the keys that decide it.
    """
    classes = np.asarray(labels)
    classes = classes if classes.ndim == 1 else classes[:, 0]
    parts = partition(classes, num_clients, source.partition, source.alpha, int(source.seed))
    mine = parts[rank]
    if source.samples_per_client is not None:
        mine = mine[: int(source.samples_per_client)]
    if len(mine) == 0:
        raise ValueError(f"client {rank} got no samples (dataset.partition={source.partition}, "
                         f"dataset.alpha={source.alpha}); raise dataset.alpha or lower num_clients")
    return mine
