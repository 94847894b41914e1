"""Several SFT datasets as one, with optional sampling weights: deterministic, per-epoch, resumable.

:class:`MixedDataset` puts the sources end to end (global index = source offset + local index) and
fixes how many samples each source gives per epoch, ``draws[k]``: its size without weights (every
sample once per epoch: plain concatenation), or the epoch's ``num_samples`` shared in proportion to
the weights (largest remainders; a positive weight gets at least one draw; weight 0: none).

:class:`MixtureSampler` (a :class:`~ds_chunkflow.data.sampler.GlobalBatchSampler`) draws the epoch's
samples and cuts them into global batches the same greedy way. Each source is read as an endless
stream of its own permutations, and epoch ``e`` takes the stream's slice ``[e * draws[k], (e + 1) *
draws[k])``; the epoch's draws of all sources are then shuffled together::

    source A (3 samples, 4 draws/epoch)  stream  a2 a0 a1 | a1 a2 a0 | a0 ...   (one permutation per pass)
    source B (4 samples, 2 draws/epoch)  stream  b3 b1 b0 b2 | ...
    epoch 0 draws  a2 a0 a1 a1  b3 b1    -> shuffled: b1 a1 a2 b3 a0 a1 -> batches
    epoch 1 draws  a2 a0 a0 a1  b0 b2    (A's second pass continues; B's first pass ends)

So an up-weighted source repeats its samples only after a full pass, a down-weighted one sees every
sample before any repeats, across epochs. Every permutation is numpy's ``default_rng`` seeded by
``(seed, what, source, pass)``: the order of an epoch is a pure function of the sources' sizes, the
draws, the seed and the epoch. The state is the epoch and the position in its order, as for one
source, so a resumed run draws exactly the samples the uninterrupted one would. Draws per source so
far are a function of that position too (:meth:`MixtureSampler.draws_per_source`); the engine logs
them as ``data_drawn_<name>``.

An epoch is ``sum(draws)`` samples (``num_samples`` when given); batches never cross it, so a run of
``E`` epochs is ``while engine.chunkflow_sampler.epoch < E: engine.train_batch()``, and
:func:`steps_for_epochs` says how many steps that is (e.g. a scheduler's ``total_num_steps``).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ds_chunkflow.data.sampler import GlobalBatchSampler

_SOURCE_PASS, _EPOCH_SHUFFLE = 1, 2  # the ``what`` of a seed: a source's pass, an epoch's mix


class MixStats:
    """The sources' :class:`~ds_chunkflow.data.jsonl.LoadStats` summed (what the engine's metrics read)."""

    def __init__(self, stats: Sequence[Any]) -> None:
        self.sources = list(stats)
        self.skipped: Counter[str] = Counter()
        for s in self.sources:
            self.skipped.update(s.skipped)
        self.num_truncated = sum(s.num_truncated for s in self.sources)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        return "\n".join(s.summary() for s in self.sources)


def _quota(sizes: np.ndarray, weights: np.ndarray | None, num_samples: int) -> np.ndarray:
    """Draws per source per epoch (see the module docstring)."""
    if weights is None:
        if num_samples == int(sizes.sum()):
            return sizes.copy()
        weights = sizes.astype(np.float64)
    exact = num_samples * weights / weights.sum()
    draws = np.floor(exact).astype(np.int64)
    # largest remainders first; ties by source order, so the split is a pure function of its inputs
    for k in sorted(range(len(exact)), key=lambda k: (-(exact[k] - draws[k]), k))[: num_samples - int(draws.sum())]:
        draws[k] += 1
    return np.where((weights > 0) & (draws == 0), 1, draws)


class MixedDataset:
    """Several datasets (``SFTDataset``, ``ArrowSFTDataset``, anything with ``lengths`` and ``[i]``) as one."""

    def __init__(self, sources: Mapping[str, Any] | Sequence[tuple[str, Any]],
                 weights: Mapping[str, float] | Sequence[float] | None = None, num_samples: int | None = None) -> None:
        items = list(sources.items()) if isinstance(sources, Mapping) else list(sources)
        if not items:
            raise ValueError("MixedDataset: no sources")
        self.names = [str(name) for name, _ in items]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"MixedDataset: source names must be unique, got {self.names}")
        self.datasets = [ds for _, ds in items]
        for name, ds in items:
            if len(ds) == 0:
                raise ValueError(f"MixedDataset: source {name} has no samples")
        sizes = np.array([len(ds) for ds in self.datasets], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.lengths = np.concatenate([np.asarray(ds.lengths, dtype=np.int64) for ds in self.datasets])
        self.weights = self._weights(weights)
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
            raise ValueError(f"MixedDataset: num_samples (per epoch) must be a positive int, got {num_samples!r}")
        self.num_samples = num_samples or int(sizes.sum())
        """Samples per epoch (before a positive weight's minimum of one draw)."""
        self.draws = _quota(sizes, self.weights, self.num_samples)
        """Samples each source gives per epoch."""
        stats = [ds.stats for ds in self.datasets if getattr(ds, "stats", None) is not None]
        self.stats = MixStats(stats) if stats else None

    def _weights(self, weights) -> np.ndarray | None:
        if weights is None:
            return None
        if isinstance(weights, Mapping):
            unknown = set(weights) - set(self.names)
            if unknown:
                raise ValueError(f"MixedDataset: weights for unknown sources {sorted(unknown)} (sources: {self.names})")
            weights = [weights.get(name, 0.0) for name in self.names]
        w = np.asarray(list(weights), dtype=np.float64)
        if w.shape != (len(self.names),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"MixedDataset: weights must be {len(self.names)} finite numbers >= 0, not all 0, "
                             f"got {list(weights)}")
        return w

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def source_of(self, indices) -> np.ndarray:
        """The source number of each global index."""
        return np.searchsorted(self.offsets, np.asarray(indices, dtype=np.int64), side="right") - 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a mix of {len(self)} samples")
        k = int(self.source_of(index))
        return self.datasets[k][int(index - self.offsets[k])]

    def make_sampler(self, *, batch_size: int | None = None, token_budget: int | None = None, seed: int = 0,
                     shuffle: bool = True) -> MixtureSampler:
        """The engine's global-batch sampler for this mix (``chunkflow.data``'s settings)."""
        return MixtureSampler(self, batch_size=batch_size, token_budget=token_budget, seed=seed, shuffle=shuffle)


class MixtureSampler(GlobalBatchSampler):
    """Global batches of a :class:`MixedDataset`'s indices (module docstring); resumable."""

    def __init__(self, mix: MixedDataset, *, batch_size: int | None = None, token_budget: int | None = None,
                 seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(mix.lengths, batch_size=batch_size, token_budget=token_budget, seed=seed, shuffle=shuffle)
        self.mix = mix
        self._passes: dict[tuple[int, int], np.ndarray] = {}

    def _pass(self, k: int, p: int) -> np.ndarray:
        """Source ``k``'s ``p``-th pass: a permutation of its local indices (identity without shuffle)."""
        key = (k, p)
        if key not in self._passes:
            n = int(self.mix.sizes[k])
            # an epoch reads at most two passes of a source in a row: older ones are dropped
            self._passes = {q: v for q, v in self._passes.items() if q[0] != k or q[1] >= p - 1}
            self._passes[key] = (np.random.default_rng([self.seed, _SOURCE_PASS, k, p]).permutation(n)
                                 if self.shuffle else np.arange(n))
        return self._passes[key]

    def _stream(self, k: int, start: int, count: int) -> np.ndarray:
        """Items ``[start, start + count)`` of source ``k``'s stream of passes, as global indices."""
        n, out, j = int(self.mix.sizes[k]), [], start
        while j < start + count:
            p, r = divmod(j, n)
            take = min(n - r, start + count - j)
            out.append(self._pass(k, p)[r:r + take])
            j += take
        local = np.concatenate(out) if out else np.empty(0, dtype=np.int64)
        return local + self.mix.offsets[k]

    def order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            draws = np.concatenate([self._stream(k, epoch * int(d), int(d)) for k, d in enumerate(self.mix.draws)])
            if self.shuffle:
                draws = draws[np.random.default_rng([self.seed, _EPOCH_SHUFFLE, epoch]).permutation(len(draws))]
            self._order, self._order_epoch = draws.tolist(), epoch
        return self._order

    def draws_per_source(self) -> dict[str, int]:
        """Samples drawn from each source so far (all epochs before this one, and this one's up to the position)."""
        counts = self.mix.draws * self._epoch
        done = self.order(self._epoch)[: self._position]
        counts = counts + np.bincount(self.mix.source_of(done), minlength=len(self.mix.names))
        return {name: int(c) for name, c in zip(self.mix.names, counts)}

    def source_metrics(self) -> dict[str, float]:
        """``data_drawn_<source>``: :meth:`draws_per_source`, for the step metrics."""
        return {f"data_drawn_{name}": float(n) for name, n in self.draws_per_source().items()}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sources": list(self.mix.names), "source_sizes": self.mix.sizes.tolist(),
                "draws_per_epoch": self.mix.draws.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the exact next sample; the sources, their sizes and draws must be the saved ones."""
        for key, mine in (("sources", list(self.mix.names)), ("source_sizes", self.mix.sizes.tolist()),
                          ("draws_per_epoch", self.mix.draws.tolist())):
            if state.get(key) != mine:
                raise ValueError(f"sampler state has {key}={state.get(key)!r} but this mix has {key}={mine!r} "
                                 "(other data files or weights than the checkpoint's run)")
        super().load_state_dict(state)


def steps_for_epochs(dataset, num_epochs: int, *, batch_size: int | None = None,
                     token_budget: int | None = None, seed: int = 0, shuffle: bool = True) -> int:
    """Optimizer steps (global batches) in the first ``num_epochs`` epochs of ``dataset`` (a :class:`MixedDataset`
    or one dataset) with these ``chunkflow.data`` settings: the sampler the engine builds, counted."""
    options = dict(batch_size=batch_size, token_budget=token_budget, seed=seed, shuffle=shuffle)
    make = getattr(dataset, "make_sampler", None)
    sampler = make(**options) if make is not None else GlobalBatchSampler(dataset.lengths, **options)
    return sum(len(sampler.epoch_batches(e)) for e in range(num_epochs))


def load_sft_mix(paths: Sequence[str | os.PathLike[str]], tokenizer, *, weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None, **load_options: Any) -> MixedDataset:
    """One :class:`MixedDataset` from several data files, each loaded by
    :func:`ds_chunkflow.data.hf_data.load_sft_data` (any format it reads, each with its own cache, errors naming
    that file and line); ``load_options`` go to every load. ``names`` default: the files' base names
    (made unique with their position when two are alike)."""
    from ds_chunkflow.data.hf_data import load_sft_data

    paths = [os.fspath(p) for p in paths]
    if names is None:
        names = [os.path.splitext(os.path.basename(p.rstrip(os.sep)))[0] for p in paths]
        if len(set(names)) != len(names):
            names = [f"{i}_{n}" for i, n in enumerate(names)]
    if len(names) != len(paths):
        raise ValueError(f"load_sft_mix: {len(names)} names for {len(paths)} files")
    return MixedDataset([(n, load_sft_data(p, tokenizer, **load_options)) for n, p in zip(names, paths)], weights)


__all__ = ["MixStats", "MixedDataset", "MixtureSampler", "load_sft_mix", "steps_for_epochs"]
