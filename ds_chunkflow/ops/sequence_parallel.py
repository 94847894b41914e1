"""Ulysses sequence parallelism for dependent chunks: a long sample spread over a group of ranks.

A group whose cost is more than one rank should carry (the cost model decides,
:func:`ds_chunkflow.plan.chunking.assign_to_ranks`) is run by P ranks together. Every chunk of it is
cut into P contiguous row shards (:class:`~ds_chunkflow.plan.chunking.Shard`); each rank runs the
model on its shard, and only attention, the one place tokens meet, sees the whole chunk. Around
it, one all-to-all over heads each way (a differentiable all-to-all over dim 0, given with the group:
:class:`SequenceParallelGroup`; the engine gives DeepSpeed's, ``deepspeed.sequence.layer``, the one
``UlyssesSPAttentionHF`` uses, through :func:`ds_chunkflow.deepspeed.deepspeed_adapter.all_to_all_dim0`;
this module imports no DeepSpeed)::

    q, k, v  [1, H, T/P, d]  (all heads, my rows)     --all-to-all-->  [1, H/P, T, d]  (my heads, all rows)
             (the three in one exchange: :meth:`UlyssesChunk.gather_heads_many`)
    attention of the whole chunk on my heads, against my heads' share of the group's K/V state
    out      [1, H/P, T, d]                            --all-to-all-->  [1, H, T/P, d]

So the K/V state of a sample is divided by P too: each rank keeps ``Hkv / P`` heads of it. Query
head h reads key/value head ``h // (H / Hkv)``; both are cut into P contiguous head blocks, so a
rank's query heads only need its own key/value heads. Limits, checked before training
(:func:`check_heads`): P divides the attention head count and the key/value head count.

Ragged shards: ``ceil(T / P)`` rows per rank, the last shards padded with pad tokens that carry
no target; the pad rows are dropped after the first all-to-all (before any token meets another)
and come back as zeros, so they never reach a real token: exact.

The gradient: each rank's loss is the CE of its rows' targets / the global count; the all-to-all's
backward is the reverse all-to-all, so a backward on every rank of the group at once (the plans
put the group's steps at the same index on all of them) gives each rank its part of the gradient,
and DeepSpeed's data-parallel average over all ranks sums them, as for any other chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch

from ds_chunkflow.constants import IGNORE_INDEX
from ds_chunkflow.plan.chunking import Shard

AllToAll = Callable[[object, torch.Tensor], torch.Tensor]
"""``(group, x) -> y``: part j of ``x`` (dim 0) goes to rank j of ``group``; y's part j came from rank j;
differentiable (its backward is the same exchange of the gradient)."""


class SequenceParallelRefused(ValueError):
    """A model or config that sequence parallelism cannot run exactly; the message says why."""


@dataclass(frozen=True)
class SequenceParallelGroup:
    """A process group a long sample's chunks are spread over, and the all-to-all to use on it."""

    group: object
    all_to_all: AllToAll


@dataclass
class UlyssesChunk:
    """What the attention of one sequence-parallel chunk needs: the group, its size, the chunk's rows,
    and the group's all-to-all."""

    group: object
    size: int
    num_tokens: int
    all_to_all: AllToAll

    @property
    def rows_per_rank(self) -> int:
        return -(-self.num_tokens // self.size)

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, H, T/P, d]`` (my rows, all heads) -> ``[1, H/P, T, d]`` (all rows, my heads)."""
        p, (b, h, s, d) = self.size, x.shape
        parts = x.reshape(b, p, h // p, s, d).transpose(0, 1)  # part j: head block j, for rank j
        got = self.all_to_all(self.group, parts)                # part j: my head block, rank j's rows
        return got.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * s, d)[:, :, :self.num_tokens]

    def gather_heads_many(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`gather_heads` of several tensors (q, k, v: head counts and head dims may differ) in ONE
        all-to-all: each tensor's parts are flattened per rank and laid side by side, exchanged once, and
        cut apart again. The same bytes move as in one exchange per tensor, in a third of the calls."""
        p = self.size
        parts = [x.reshape(x.shape[0], p, x.shape[1] // p, *x.shape[2:]).transpose(0, 1) for x in xs]
        flat = torch.cat([t.reshape(p, -1) for t in parts], dim=1)
        got = self.all_to_all(self.group, flat)  # row j: my head blocks of every tensor, rank j's rows
        out, start = [], 0
        for t in parts:
            n = t[0].numel()
            g = got[:, start:start + n].reshape(t.shape)
            start += n
            b, h, s, d = g.shape[1], g.shape[2], g.shape[3], g.shape[4]
            out.append(g.permute(1, 2, 0, 3, 4).reshape(b, h, p * s, d)[:, :, :self.num_tokens])
        return out

    def my_heads(self, per_head: torch.Tensor) -> torch.Tensor:
        """``[H, ...]`` -> ``[H/P, ...]``: this rank's block of heads, as :meth:`gather_heads` assigns them
        (a per-head parameter such as GPT-OSS's attention sinks)."""
        n = per_head.shape[0] // self.size
        r = torch.distributed.get_rank(self.group)
        return per_head[r * n:(r + 1) * n]

    def scatter_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, H/P, T, d]`` -> ``[1, H, T/P, d]``: the inverse of :meth:`gather_heads` (pad rows as zeros)."""
        p, s, (b, h, t, d) = self.size, self.rows_per_rank, x.shape
        if p * s > t:
            x = torch.cat([x, x.new_zeros(b, h, p * s - t, d)], dim=2)
        parts = x.reshape(b, h, p, s, d).permute(2, 0, 1, 3, 4)  # part j: rank j's rows, my heads
        got = self.all_to_all(self.group, parts)                 # part j: head block j, my rows
        return got.transpose(0, 1).reshape(b, p * h, s, d)


def shard_inputs(full, shard: Shard, pad_token_id: int):
    """This rank's rows of a chunk (a :class:`~ds_chunkflow.runtime.batch.ChunkInputs`, returned as one),
    padded to ``ceil(T / P)`` rows (pad tokens, no targets)."""
    t = full.input_ids.shape[1]
    lo, hi = shard.rows(t)
    pad = shard.rows_per_rank(t) - (hi - lo)

    def rows(x: torch.Tensor, fill: int) -> torch.Tensor:
        out = x[:, lo:hi]
        return torch.cat([out, out.new_full((1, pad), fill)], dim=1) if pad else out

    # pad positions: the chunk's first position, valid for any position embedding
    first = int(full.position_ids[0, 0])
    targets = rows(full.targets, IGNORE_INDEX)
    return replace(full, input_ids=rows(full.input_ids, pad_token_id), position_ids=rows(full.position_ids, first),
                   targets=targets, target_rows=(targets[0] != IGNORE_INDEX).nonzero().squeeze(1))


def ulysses_chunk(shard: Shard, num_tokens: int,
                  groups: Mapping[tuple[int, ...], SequenceParallelGroup]) -> UlyssesChunk:
    if shard.ranks not in groups:
        raise RuntimeError(f"no sequence-parallel process group for data-parallel ranks {shard.ranks}")
    group = groups[shard.ranks]
    return UlyssesChunk(group.group, shard.size, num_tokens, group.all_to_all)


def check_heads(config, max_size: int) -> None:
    """Refuses a sequence-parallel size the model's head counts do not divide (before training)."""
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    name = type(config).__name__
    if heads is None:
        raise SequenceParallelRefused(f"chunkflow.sequence_parallel.max_size: {max_size}: {name} has no "
                                      "num_attention_heads; sequence parallelism splits attention heads")
    for what, n in (("num_attention_heads", heads), ("num_key_value_heads", kv)):
        if n % max_size:
            raise SequenceParallelRefused(
                f"chunkflow.sequence_parallel.max_size: {max_size} does not divide {name}.{what} = {n}; each rank "
                f"of a sequence-parallel group takes an equal block of heads, so max_size must divide both head "
                f"counts (here: a power of two dividing {heads} and {kv})")


def sp_group_ranks(num_ranks: int, sizes: list[int]) -> list[tuple[int, ...]]:
    """Every aligned block of data-parallel ranks a group of each size may run on."""
    return [tuple(range(b, b + p)) for p in sizes for b in range(0, num_ranks, p)]

