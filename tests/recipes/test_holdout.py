"""Tests for ds_chunkflow/recipes/holdout.py: the seeded --eval_split holdout (pure CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from ds_chunkflow.recipes.holdout import holdout_split


class Lines:
    """A stand-in dataset: ``lengths`` and the 1-based source ``line_numbers`` of each sample."""

    def __init__(self, line_numbers):
        self.line_numbers = list(line_numbers)
        self.lengths = np.ones(len(self.line_numbers), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.line_numbers)


@pytest.mark.parametrize("seed", range(8))
def test_samples_of_one_line_stay_on_one_side(seed) -> None:
    """The samples of a chat expanded per assistant turn (one source line) are never split between train and
    eval: the eval set cannot see a conversation whose other turns are trained on."""
    data = Lines([1, 1, 1, 1, 2, 4, 4, 5, 6, 7, 7, 7, 9, 10])
    train, held = holdout_split(data, 0.3, seed=seed)
    train_lines, held_lines = set(train.line_numbers.tolist()), set(held.line_numbers.tolist())
    assert train_lines.isdisjoint(held_lines) and train_lines | held_lines == set(data.line_numbers)
    assert len(held_lines) == round(0.3 * 8) and sorted(train.indices.tolist() + held.indices.tolist()) == list(range(14))


@pytest.mark.parametrize("seed", range(4))
def test_one_sample_per_line_draws_as_before(seed) -> None:
    """Without expansion (one sample per line) the split is the per-sample permutation it always was."""
    n = 23
    train, held = holdout_split(Lines(range(1, n + 1)), 0.25, seed=seed)
    expected = np.sort(np.random.default_rng(seed).permutation(n)[: round(0.25 * n)])
    assert held.indices.tolist() == expected.tolist() and len(train) == n - len(expected)


def test_one_line_cannot_be_split() -> None:
    """One expanded chat is one line: nothing to hold out."""
    with pytest.raises(ValueError, match="nothing to hold out"):
        holdout_split(Lines([3, 3, 3]), 0.5, seed=0)
