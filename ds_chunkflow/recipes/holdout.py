"""A seeded held-out evaluation split of a dataset (``--eval_split``): its samples are never trained on."""

from __future__ import annotations

import numpy as np


class Subset:
    """Samples ``indices`` of ``data`` (an SFT dataset: ``len``, ``[i]``, ``lengths``), renumbered from 0;
    ``line_numbers`` and ``stats`` follow the parent's."""

    def __init__(self, data, indices: np.ndarray):
        self.data, self.indices = data, np.asarray(indices, dtype=np.int64)
        self.lengths = np.asarray(data.lengths)[self.indices]
        self.stats = getattr(data, "stats", None)
        parent_lines = getattr(data, "line_numbers", None)
        self.line_numbers = None if parent_lines is None else np.asarray(parent_lines)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.data[int(self.indices[index])]

    def num_loss_tokens(self, indices=None) -> int:
        chosen = self.indices if indices is None else self.indices[np.fromiter(indices, dtype=np.int64)]
        return int(self.data.num_loss_tokens(chosen.tolist()))


def holdout_split(data, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """``(train, eval)``: ``round(fraction * len)`` samples (at least 1, at most all but 1) drawn by a
    permutation seeded with ``seed``; both keep the parent's order. The same on every rank. Samples of one
    source line (a chat expanded per assistant turn: ``line_numbers``) are drawn together, as one."""
    if not 0 < fraction < 1:
        raise ValueError(f"--eval_split: a fraction in (0, 1), got {fraction}")
    lines = getattr(data, "line_numbers", None)
    group = np.arange(len(data)) if lines is None else np.unique(np.asarray(lines), return_inverse=True)[1]
    n = int(group.max()) + 1 if len(group) else 0
    if n < 2:
        what = f"{n} sample(s)" if n == len(data) else f"{len(data)} samples from {n} line(s)"
        raise ValueError(f"--eval_split: the training data has {what}; nothing to hold out")
    num_eval = min(n - 1, max(1, round(fraction * n)))
    held = np.flatnonzero(np.isin(group, np.random.default_rng(seed).permutation(n)[:num_eval]))
    keep = np.setdiff1d(np.arange(len(data)), held)
    return Subset(data, keep), Subset(data, held)
