"""What running one chunk means, shared by both engines' executors.

The data-parallel :class:`~ds_chunkflow.runtime.executor.Executor` and the pipeline engine's
handlers differ in how a forward reaches the model (one call vs. one stage of a pipeline)
but not in what a chunk is. :class:`ChunkRun` holds, for one global batch, everything that is
per chunk and must be the same in both:

* **targets**: shifted once per whole sequence before any cut (``batch.shifted_targets``);
* **inputs**: the chunk's ids / positions / targets (``batch.materialize``); a sequence-parallel
  shard's rows only (:mod:`ds_chunkflow.ops.sequence_parallel`);
* **state**: the K/V state of each dependent group, created at its first chunk (on the CPU
  for sequences of at least ``kv_state_min_tokens``), freed with :meth:`release`;
* **RNG replay**: the RNG state before a chunk's first forward, restored for its recompute
  so dropout draws the same masks (:meth:`remember_rng`, :meth:`replayed_rng`);
* **loss**: ``sum(CE over the chunk's targets) / num_loss_tokens``, from the final hidden states
  in a fixed number of pieces of target rows (:func:`head_loss`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ds_chunkflow.constants import IGNORE_INDEX
from ds_chunkflow.ops.context import ChunkContext, SegmentSpec
from ds_chunkflow.ops.sequence_parallel import UlyssesChunk, shard_inputs, ulysses_chunk
from ds_chunkflow.ops.state import GroupState
from ds_chunkflow.plan.chunking import Chunk
from ds_chunkflow.runtime.batch import ChunkInputs, SequenceDict, materialize, shifted_targets


def chunk_context(chunk: Chunk, state: GroupState | None, sp: UlyssesChunk | None = None) -> ChunkContext:
    """The attention's view of a chunk: one segment per packed sequence, or one dependent piece.
    A sequence-parallel shard's attention sees the whole chunk (after the all-to-all, ``sp``)."""
    specs, row = [], 0
    for s in chunk.segments:
        specs.append(SegmentSpec(row, s.length, s.start if chunk.is_dependent else 0, state))
        row += s.length
    return ChunkContext(specs, sp=sp)


def get_rng() -> tuple:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def _loss_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _piece_ce(head: Callable, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    return F.cross_entropy(logits.to(_loss_dtype(logits)), targets, reduction="sum")


def head_loss(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
              num_loss_tokens: int, num_pieces: int) -> torch.Tensor:
    """``sum(next-token CE over targets) / num_loss_tokens`` of one chunk from its final hidden states
    ``[1, T, H]`` (float32, or float64 for a float64 model), never holding ``[T, vocab]`` logits.

    Only target rows are projected, in ``num_pieces`` near-equal pieces; each piece's ``head`` + CE
    runs under a non-reentrant checkpoint, so backward keeps one piece's hidden rows and recomputes its
    logits::

        rows      [h0 h1 h2 h3 h4 h5 h6]          targets [-- 5 9 -- -- 3 --]
        kept      [   h1 h2       h5   ]          2 pieces: [h1 h2] [h5]

    ``head`` is called exactly ``num_pieces`` times, forward and backward, however many targets the
    chunk has (pieces may be empty, a chunk without targets included): under ZeRO-3 every call
    gathers the head's weight collectively, so every rank must make the same calls.
    """
    if hidden.shape[0] != 1:
        raise ValueError(f"a chunk is one row (batch 1), got hidden states of batch {hidden.shape[0]}")
    keep = (targets[0] != IGNORE_INDEX).nonzero().squeeze(1)
    rows, goals = hidden[0].index_select(0, keep), targets[0].index_select(0, keep)
    total = None
    check = getattr(head, "determinism_check", "default")  # "none" for a frozen ZeRO-3 head (deepspeed_adapter 7)
    for piece_rows, piece_goals in zip(torch.tensor_split(rows, num_pieces), torch.tensor_split(goals, num_pieces)):
        piece = checkpoint(_piece_ce, head, piece_rows, piece_goals, use_reentrant=False, determinism_check=check)
        total = piece if total is None else total + piece
    return total / num_loss_tokens


def num_loss_pieces(chunk_size: int, piece_tokens: int) -> int:
    """Pieces per chunk so that none exceeds ``piece_tokens`` target rows (a chunk has at most chunk_size)."""
    return -(-chunk_size // piece_tokens)


@dataclass
class ChunkRun:
    """Per-chunk bookkeeping of one global batch (see the module docstring)."""

    sequences: Sequence[SequenceDict]
    device: torch.device
    kv_state_min_tokens: int | None = None
    sp_groups: Mapping[tuple[int, ...], object] = field(default_factory=dict)
    """Data-parallel ranks of a sequence-parallel block -> its process group."""
    pad_token_id: int = 0
    states: dict[int, GroupState] = field(default_factory=dict)
    _rng: dict[Hashable, tuple] = field(default_factory=dict)
    bytes_moved: int = 0
    mixer_bytes_per_boundary: int = 0

    def __post_init__(self) -> None:
        self.targets = [shifted_targets(s["labels"]) for s in self.sequences]

    def inputs(self, chunk: Chunk) -> ChunkInputs:
        """The chunk's tensors; a sequence-parallel shard's rows only (padded, :func:`shard_inputs`)."""
        full = materialize(chunk, self.sequences, self.targets, device=self.device)
        return full if chunk.shard is None else shard_inputs(full, chunk.shard, self.pad_token_id)

    def state(self, chunk: Chunk) -> GroupState | None:
        """The K/V state of a dependent chunk's group (created at first use); None for a standalone chunk."""
        if not chunk.is_dependent:
            return None
        if chunk.group not in self.states:
            seq_len = int(self.sequences[chunk.group]["input_ids"].numel())
            self.states[chunk.group] = GroupState.for_sequence(seq_len, self.kv_state_min_tokens)
        return self.states[chunk.group]

    def context(self, chunk: Chunk) -> ChunkContext:
        sp = None if chunk.shard is None else ulysses_chunk(chunk.shard, chunk.num_tokens, self.sp_groups)
        return chunk_context(chunk, self.state(chunk), sp)

    def release(self, group: int) -> None:
        """Frees a group's K/V state after its last backward."""
        state = self.states.pop(group)
        self.bytes_moved += state.bytes_moved
        if state.mixers is not None:  # a hybrid's recurrent state: constant in the sample's length
            self.mixer_bytes_per_boundary = max(self.mixer_bytes_per_boundary, state.mixers.bytes_per_boundary)

    def remember_rng(self, key: Hashable) -> None:
        """Before a chunk's first forward: the RNG state its recompute will replay."""
        self._rng[key] = get_rng()

    def forget_rng(self, key: Hashable) -> None:
        self._rng.pop(key, None)

    @contextlib.contextmanager
    def replayed_rng(self, key: Hashable):
        """Runs the block from the RNG state remembered for ``key``; the current state is restored after."""
        current = get_rng()
        set_rng(self._rng[key])
        try:
            yield
        finally:
            set_rng(current)

    @property
    def pending(self) -> bool:
        """Work left over (state or RNG of a chunk without its backward): a plan that did not finish."""
        return bool(self.states or self._rng)
