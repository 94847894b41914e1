"""Global batches of sample indices, shuffled per epoch and resumable.

:class:`GlobalBatchSampler` yields global batches of indices forever: per epoch, a
permutation seeded by ``seed + epoch`` (a local ``torch.Generator``), cut greedily into
batches of ``batch_size`` samples, or of as many samples as fit in ``token_budget``
tokens (a sample longer than the budget is a batch of its own, never dropped)::

    token_budget 10, shuffled lengths [4 5 | 3 6 | 12 | 2 7]  -> 4 batches
    batches never cross an epoch; the last one of an epoch may be smaller.

Every sample appears exactly once per epoch. ``state_dict`` stores (epoch, position in
the epoch's order); batches are formed greedily from a batch boundary, so a resumed
sampler yields exactly the batches an uninterrupted one would. ``lengths`` may be a list or a
numpy integer array (:class:`ds_chunkflow.data.hf_data.ArrowSFTDataset.lengths`); it is kept as one
int64 array, so a large dataset costs 8 bytes per sample here, not a Python list.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class GlobalBatchSampler:
    """Infinite iterator of global batches (lists of sample indices); see the module docstring."""

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        batch_size: int | None = None,
        token_budget: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if (batch_size is None) == (token_budget is None):
            raise ValueError(f"give exactly one of batch_size and token_budget, got {batch_size=}, {token_budget=}")
        for name, value in (("batch_size", batch_size), ("token_budget", token_budget)):
            if value is not None and not _is_positive_int(value):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if len(lengths) == 0:
            raise ValueError("lengths is empty: nothing to sample")
        if isinstance(lengths, np.ndarray):
            if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
                raise ValueError(f"lengths must be a 1-D integer array, got {lengths.dtype} of shape {lengths.shape}")
            nonpositive = np.flatnonzero(lengths <= 0)
            bad = int(nonpositive[0]) if len(nonpositive) else None
        else:
            bad = next((i for i, n in enumerate(lengths) if not _is_positive_int(n)), None)
        if bad is not None:
            raise ValueError(f"lengths[{bad}] = {lengths[bad]!r} must be a positive int")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.token_budget = batch_size, token_budget
        self.seed, self.shuffle = seed, shuffle
        self._epoch, self._position = 0, 0
        self._order_epoch, self._order = -1, []

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    def order(self, epoch: int) -> list[int]:
        """The sample order of ``epoch``: a permutation seeded by ``seed + epoch``, or identity."""
        if epoch != self._order_epoch:
            n = len(self.lengths)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(n, generator=g).tolist()
            else:
                self._order = list(range(n))
            self._order_epoch = epoch
        return self._order

    def _next_batch(self, order: list[int], start: int) -> list[int]:
        """Greedy batch from ``order[start:]``; depends only on ``start``, which makes resume exact."""
        if self.batch_size is not None:
            return order[start : start + self.batch_size]
        assert self.token_budget is not None
        batch, tokens = [], 0
        for j in range(start, len(order)):  # no order[start:] copy: O(batch), not O(epoch), per batch
            i = order[j]
            # The first sample always goes in: one longer than the budget is a batch of its own.
            n = int(self.lengths[i])
            if batch and tokens + n > self.token_budget:
                break
            batch.append(i)
            tokens += n
        return batch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch``, without moving the iterator (e.g. to count steps)."""
        order, batches, start = self.order(epoch), [], 0
        while start < len(order):
            batches.append(self._next_batch(order, start))
            start += len(batches[-1])
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        order = self.order(self._epoch)
        batch = self._next_batch(order, self._position)
        self._position += len(batch)
        if self._position == len(order):
            self._epoch, self._position = self._epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "num_samples": len(self.lengths),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "token_budget": self.token_budget,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the exact next sample; the sampler's settings must match the saved ones."""
        for key in ("num_samples", "seed", "shuffle", "batch_size", "token_budget"):
            mine = len(self.lengths) if key == "num_samples" else getattr(self, key)
            if state.get(key) != mine:
                raise ValueError(f"sampler state has {key}={state.get(key)!r} but this sampler has {key}={mine!r}")
        if state["epoch"] < 0 or not 0 <= state["position"] < len(self.order(int(state["epoch"]))):
            raise ValueError(f"sampler state has bad epoch/position: {state['epoch']}/{state['position']}")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
