"""``dataset=tokens``: synthetic token sequences for ``model=transformer`` (flmem.synthetic); no files."""
from __future__ import annotations

from dataclasses import dataclass

from flmem.datasets.base import DataSource


@dataclass(kw_only=True)
class SyntheticTokens(DataSource):
    """``train_size``/``test_size`` sequences of ``seq_len`` token ids in ``0..vocab_size-1``, each token mostly
    following from the one before (flmem.synthetic.tokens). The released paths copy the kept sequences out
    of the whole split and drop it (:class:`flmem.datasets.base.DataSource`'s defaults)."""
    vocab_size: int = 512
    seq_len: int = 64
    train_size: int = 2048
    test_size: int = 256

    def load_split(self, train: bool):
        from flmem import synthetic
        from flmem.datasets.split import SplitData

        return SplitData(*synthetic.tokens(self, train))
