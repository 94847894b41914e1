"""What running one chunk means, shared by both engines' executors.

The data-parallel :class:`~ds_chunkflow.executor.Executor` and the pipeline engine's
handlers differ in how a forward reaches the model (one call vs. one stage of a pipeline)
but not in what a chunk is. :class:`ChunkRun` holds, for one global batch, everything that is
per chunk and must be the same in both:

* **targets**: shifted once per whole sequence before any cut (``batch.shifted_targets``);
* **inputs**: the chunk's ids / positions / targets (``batch.materialize``);
* **state**: the K/V state of each dependent group, created at its first chunk (on the CPU
  for sequences of at least ``kv_state_min_tokens``), freed with :meth:`release`;
* **RNG replay**: the RNG state before a chunk's first forward, restored for its recompute
  so dropout draws the same masks (:meth:`remember_rng`, :meth:`replayed_rng`);
* **loss**: ``sum(CE over the chunk's targets) / num_loss_tokens`` (:func:`chunk_loss`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch
import torch.nn.functional as F

from .attention import ChunkContext, SegmentSpec
from .batch import ChunkInputs, SequenceDict, materialize, shifted_targets
from .chunking import IGNORE_INDEX, Chunk
from .state import GroupState


def chunk_context(chunk: Chunk, state: GroupState | None) -> ChunkContext:
    """The attention's view of a chunk: one segment per packed sequence, or one dependent piece."""
    specs, row = [], 0
    for s in chunk.segments:
        specs.append(SegmentSpec(row, s.length, s.start if chunk.is_dependent else 0, state))
        row += s.length
    return ChunkContext(specs)


def get_rng() -> tuple:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def chunk_loss(logits: torch.Tensor, targets: torch.Tensor, num_loss_tokens: int) -> torch.Tensor:
    """``sum(next-token CE over targets) / num_loss_tokens`` for one chunk (batch 1), in float32 or float64."""
    if logits.shape[0] != 1:
        raise ValueError(f"a chunk is one row (batch 1), got logits of batch {logits.shape[0]}")
    logits = logits[0] if logits.dtype == torch.float64 else logits[0].float()
    return F.cross_entropy(logits, targets[0], ignore_index=IGNORE_INDEX, reduction="sum") / num_loss_tokens


@dataclass
class ChunkRun:
    """Per-chunk bookkeeping of one global batch (see the module docstring)."""

    sequences: Sequence[SequenceDict]
    device: torch.device
    kv_state_min_tokens: int | None = None
    states: dict[int, GroupState] = field(default_factory=dict)
    _rng: dict[Hashable, tuple] = field(default_factory=dict)
    bytes_moved: int = 0

    def __post_init__(self) -> None:
        self.targets = [shifted_targets(s["labels"]) for s in self.sequences]

    def inputs(self, chunk: Chunk) -> ChunkInputs:
        return materialize(chunk, self.sequences, self.targets, device=self.device)

    def state(self, chunk: Chunk) -> GroupState | None:
        """The K/V state of a dependent chunk's group (created at first use); None for a standalone chunk."""
        if not chunk.is_dependent:
            return None
        if chunk.group not in self.states:
            seq_len = int(self.sequences[chunk.group]["input_ids"].numel())
            self.states[chunk.group] = GroupState.for_sequence(seq_len, self.kv_state_min_tokens)
        return self.states[chunk.group]

    def context(self, chunk: Chunk) -> ChunkContext:
        return chunk_context(chunk, self.state(chunk))

    def release(self, group: int) -> None:
        """Frees a group's K/V state after its last backward."""
        self.bytes_moved += self.states.pop(group).bytes_moved

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
