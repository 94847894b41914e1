"""One global batch of sequences -> every rank's aligned chunk plan (no process group: every rank computes it).

Chunks are built from the whole global batch, which every data-parallel rank holds, so
every rank computes the same layout and the same assignment without communicating and
then runs only its own plan.

Which calls must meet: under ZeRO-3 every forward and backward gathers parameters from every rank, so the
plans are aligned step by step (``align(lockstep=True)``). Under ZeRO-0/1/2 only two kinds of call meet:
a backward (ZeRO-2 reduces the gradients in each, ZeRO-0/1 at the boundary: the i-th backward of every
rank meets) and a sequence-parallel chunk's all-to-alls (between the ranks of its block). Count alignment
(pads at the end) is enough for both, with no deadlock: every rank runs its sequence-parallel groups
first, in the assignment's order, and the blocks nest (:func:`~ds_chunkflow.plan.chunking.assign_to_ranks`),
so the ranks of a block run the same instructions up to and including the block's group. A rank waiting
in a block's all-to-all waits for a rank of the block that is at an earlier instruction of that same
prefix, and so has nothing to wait for that the first has not already passed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from ds_chunkflow.plan.chunking import ChunkLayout, CostModel, RankShare, imbalance, plan_layout
from ds_chunkflow.plan.schedule import (
    Step,
    align,
    align_eval,
    build_eval_plan,
    build_plan,
    join_at_barriers,
    join_backwards,
    plan_stats,
)
from ds_chunkflow.runtime.batch import SequenceDict, count_loss_tokens, validate_sequences

logger = logging.getLogger(__name__)


@dataclass
class BatchPlan:
    sequences: list[SequenceDict]  # after the max_seq_len guard
    layout: ChunkLayout
    shares: list[RankShare]
    rank_plans: list[list[Step]]        # aligned: same collective shape on every rank
    num_loss_tokens: int
    num_skipped: int = 0

    @property
    def imbalance(self) -> float:
        """max / mean of the ranks' modelled cost."""
        return imbalance([s.cost for s in self.shares])

    @property
    def num_sp_groups(self) -> int:
        """Dependent groups spread over a sequence-parallel group of ranks."""
        return len({g[0].group for s in self.shares for g in s.sp_groups})

    def recompute_fraction(self) -> float:
        stats = [plan_stats(p) for p in self.rank_plans]
        return sum(s.recompute_tokens for s in stats) / max(1, sum(s.forward_tokens for s in stats))


def guard_lengths(sequences: Sequence[SequenceDict], max_seq_len: int | None, on_overlong: str):
    """Applies the max_seq_len guard: an error naming the sample, or a counted skip. Never truncates."""
    lengths = validate_sequences(sequences)
    if max_seq_len is None:
        return list(sequences), 0
    over = [i for i, n in enumerate(lengths) if n > max_seq_len]
    if over and on_overlong == "error":
        i = over[0]
        raise ValueError(f"sample {i} of the global batch has {lengths[i]} tokens > chunkflow.max_seq_len="
                         f"{max_seq_len} ({len(over)} such samples); raise max_seq_len or set on_overlong: skip")
    if over:
        logger.warning("skipped %d samples longer than max_seq_len=%d", len(over), max_seq_len)
    keep = set(range(len(sequences))) - set(over)
    return [s for i, s in enumerate(sequences) if i in keep], len(over)


def plan_batch(sequences: Sequence[SequenceDict], *, chunk_size: int, keep_chunks: int, num_ranks: int = 1,
               offload_activations: bool = False, cost: CostModel | None = None, max_seq_len: int | None = None,
               on_overlong: str = "error", num_loss_tokens: int | None = None, sp_max_size: int = 1,
               evaluation: bool = False, forwards_collective: bool = True, backwards_collective: bool = False,
               sp_longer_chunks: bool = True) -> BatchPlan:
    """``evaluation``: forward-only plans (:func:`~ds_chunkflow.plan.schedule.build_eval_plan`) whose losses are
    sums of cross-entropy (``num_loss_tokens`` is 1); a batch without targets is allowed then.
    ``forwards_collective``: every forward meets the other ranks (ZeRO-3); ``backwards_collective``: every
    backward does (ZeRO-2 reduces the gradients in each), so standalone chunks' backwards are joined to fill
    the waits (:func:`~ds_chunkflow.plan.schedule.join_at_barriers`)."""
    kept, skipped = guard_lengths(sequences, max_seq_len, on_overlong)
    if not kept:
        raise ValueError("the global batch is empty (after the max_seq_len guard)")
    lengths = [int(s["input_ids"].numel()) for s in kept]
    if evaluation:
        layout, shares = plan_layout(lengths, chunk_size, num_ranks, cost, sp_max_size,
                                     sp_longer_chunks=sp_longer_chunks)
        return BatchPlan(kept, layout, shares, align_eval([build_eval_plan(s) for s in shares]), 1, skipped)
    if num_loss_tokens is None:
        num_loss_tokens = count_loss_tokens(kept)
    if num_loss_tokens <= 0:
        raise ValueError("num_loss_tokens must be > 0: the batch has no label to predict (all labels are -100)")
    layout, shares = plan_layout(lengths, chunk_size, num_ranks, cost, sp_max_size,
                                 sp_longer_chunks=sp_longer_chunks)
    # ranks in lock-step where every forward is collective (ZeRO-3); otherwise only the number of backwards must
    # agree (plan.schedule.align). A sequence-parallel chunk's all-to-alls need no alignment: see the module doc.
    plans = [build_plan(s, keep_chunks, offload_activations) for s in shares]
    if backwards_collective and not forwards_collective:  # K standalone chunks or fewer per backward, where they
        plans = join_at_barriers(plans, keep_chunks, cost or CostModel())  # fill the other ranks' waits (ZeRO-2)
    elif not forwards_collective:  # one backward per K standalone chunks (ZeRO-0/1: only the last one meets)
        plans = [join_backwards(p, keep_chunks) for p in plans]
    plans = align(plans, lockstep=forwards_collective)
    return BatchPlan(kept, layout, shares, plans, num_loss_tokens, skipped)
