"""The chunk runtime: what running one chunk means, for every caller.

One :class:`ChunkRuntime` per global batch runs its chunks for the data-parallel executor
(:mod:`ds_chunkflow.runtime.executor`), the pipeline engine's handlers
(:mod:`ds_chunkflow.pipeline.engine`), the guard's probe and the autotune probe. The callers differ
only in how a forward reaches the model (one call, or one stage of a pipeline: the ``call`` given to
:meth:`ChunkRuntime.forward`); everything per chunk is here:

* **hooks**: the attention and the recurrent mixers routed through ChunkFlow for a block (:func:`hooks`);
* **targets**: shifted once per whole sequence before any cut (``batch.shifted_targets``);
* **inputs**: the chunk's ids / positions / targets and its target rows, cut on the host and moved to the
  device once (``batch.materialize``); a sequence-parallel shard's rows only;
* **state**: the K/V state of each dependent group, created at its first chunk (on the CPU for sequences
  of at least ``kv_state_min_tokens``), freed with :meth:`ChunkRuntime.release`;
* **forward**: by :class:`Mode` — with a graph or without, the RNG state remembered before a chunk's
  first forward and replayed for its recompute (dropout draws the same masks), saved tensors counted or
  offloaded to the CPU (:func:`~ds_chunkflow.runtime.memory.saved_tensor_hooks`);
* **loss**: ``sum(CE over the chunk's targets) / num_loss_tokens`` from the final hidden states in a fixed
  number of pieces of target rows (:func:`head_loss`), summed on the device: nothing is read back to the
  host until the caller asks for :attr:`ChunkRuntime.loss_sum` at the end of the step.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ds_chunkflow.constants import IGNORE_INDEX
from ds_chunkflow.ops.attention import use_chunkflow_attention
from ds_chunkflow.ops.context import ChunkContext, SegmentSpec
from ds_chunkflow.ops.mixers import chunk_scope, use_chunkflow_mixers
from ds_chunkflow.ops.sequence_parallel import UlyssesChunk, shard_inputs, ulysses_chunk
from ds_chunkflow.ops.state import GroupState
from ds_chunkflow.plan.chunking import Chunk
from ds_chunkflow.runtime.batch import ChunkInputs, SequenceDict, materialize, shifted_targets
from ds_chunkflow.runtime.memory import ActivationMeter, saved_tensor_hooks


class Mode(enum.Enum):
    """How a chunk's forward runs (the instruction that asked for it)."""

    KEEP = "keep"            # Forward: a graph for its backward; a dependent chunk's RNG state remembered
    STATE = "state"          # StateForward: no graph, fills the K/V state; RNG state remembered for the recompute
    RECOMPUTE = "recompute"  # Recompute: a graph again, from the remembered RNG state
    EVAL = "eval"            # EvalForward: no graph, no RNG bookkeeping

    @property
    def builds_graph(self) -> bool:
        return self in (Mode.KEEP, Mode.RECOMPUTE)


@contextlib.contextmanager
def hooks(model: torch.nn.Module, config=None, from_forward_kwargs: bool = True):
    """ChunkFlow's attention and recurrent mixers for the block: the one place both are entered.

    ``model``: the module whose mixers are routed (a pipeline stage's module, or the whole model);
    ``config``: the transformers config whose attention implementation is switched (default
    ``model.config``). ``from_forward_kwargs=False`` (pipeline stages, which call their layers
    directly): the mixers get the chunk from :meth:`ChunkRuntime.forward` alone.
    """
    with (use_chunkflow_attention(config if config is not None else model.config),
          use_chunkflow_mixers(model, from_forward_kwargs=from_forward_kwargs)):
        yield


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
              num_loss_tokens: int, num_pieces: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``sum(next-token CE over targets) / num_loss_tokens`` of one chunk from its final hidden states
    ``[1, T, H]`` (float32, or float64 for a float64 model), never holding ``[T, vocab]`` logits.

    Only target rows are projected (``rows``: their indices, computed on the host with the inputs so
    the device is not asked; found here if not given), in ``num_pieces`` near-equal pieces; each
    piece's ``head`` + CE runs under a non-reentrant checkpoint, so backward keeps one piece's hidden
    rows and recomputes its logits::

        rows      [h0 h1 h2 h3 h4 h5 h6]          targets [-- 5 9 -- -- 3 --]
        kept      [   h1 h2       h5   ]          2 pieces: [h1 h2] [h5]

    ``head`` is called exactly ``num_pieces`` times, forward and backward, however many targets the
    chunk has (pieces may be empty, a chunk without targets included): under ZeRO-3 every call
    gathers the head's weight collectively, so every rank must make the same calls.
    """
    if hidden.shape[0] != 1:
        raise ValueError(f"a chunk is one row (batch 1), got hidden states of batch {hidden.shape[0]}")
    keep = (targets[0] != IGNORE_INDEX).nonzero().squeeze(1) if rows is None else rows
    picked, goals = hidden[0].index_select(0, keep), targets[0].index_select(0, keep)
    total = None
    check = getattr(head, "determinism_check", "default")  # "none" for a frozen ZeRO-3 head (deepspeed_adapter 7)
    for piece_rows, piece_goals in zip(torch.tensor_split(picked, num_pieces), torch.tensor_split(goals, num_pieces)):
        piece = checkpoint(_piece_ce, head, piece_rows, piece_goals, use_reentrant=False, determinism_check=check)
        total = piece if total is None else total + piece
    return total / num_loss_tokens


def num_loss_pieces(chunk_size: int, piece_tokens: int) -> int:
    """Pieces per chunk so that none exceeds ``piece_tokens`` target rows (a chunk has at most chunk_size)."""
    return -(-chunk_size // piece_tokens)


@dataclass
class ChunkRuntime:
    """Runs the chunks of one global batch (see the module docstring)."""

    sequences: Sequence[SequenceDict]
    device: torch.device
    num_loss_tokens: int = 1
    """The global batch's loss normaliser (1 for evaluation: losses are sums)."""
    loss_pieces: int = 1
    """Pieces of the chunked lm_head + CE per chunk (the same on every rank: ZeRO-3 gathers per call)."""
    kv_state_min_tokens: int | None = None
    sp_process_groups: Mapping[tuple[int, ...], object] = field(default_factory=dict)
    """Data-parallel ranks of a sequence-parallel block -> its process group (shards need them)."""
    pad_token_id: int = 0
    meter: ActivationMeter = field(default_factory=ActivationMeter.offload_only)
    require_attention: bool = True
    """Refuse a forward whose layers never reached the ChunkFlow attention (False: a pipeline stage)."""
    states: dict[int, GroupState] = field(default_factory=dict)
    _rng: dict[Hashable, tuple] = field(default_factory=dict)
    bytes_moved: int = 0
    mixer_bytes_per_boundary: int = 0
    num_forwards: int = 0
    num_recomputes: int = 0
    peak_state_bytes: int = 0

    def __post_init__(self) -> None:
        self.targets = [shifted_targets(s["labels"]) for s in self.sequences]
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        """Sum of the chunk losses so far, on the device (read it once, when the step ends)."""

    @classmethod
    def from_config(cls, sequences: Sequence[SequenceDict], cf, device: torch.device, num_loss_tokens: int = 1,
                    chunk_size: int | None = None, **kwargs) -> "ChunkRuntime":
        """A runtime with the options of a :class:`~ds_chunkflow.config.ChunkFlowConfig` (``chunk_size``: the
        one to plan with where the config's is ``auto``, the autotune probe's)."""
        pieces = num_loss_pieces(chunk_size or cf.chunk_size, cf.loss_piece_tokens)
        return cls(sequences, device, num_loss_tokens, pieces, cf.offload.kv_state_min_tokens,
                   pad_token_id=cf.pad_token_id, **kwargs)

    # ------------------------------------------------------------------ per chunk
    def inputs(self, chunk: Chunk) -> ChunkInputs:
        """The chunk's tensors on the device; a sequence-parallel shard's rows only (padded, :func:`shard_inputs`)."""
        full = materialize(chunk, self.sequences, self.targets)
        host = full if chunk.shard is None else shard_inputs(full, chunk.shard, self.pad_token_id)
        return host.to(self.device)

    def state(self, chunk: Chunk) -> GroupState | None:
        """The K/V state of a dependent chunk's group (created at first use); None for a standalone chunk."""
        if not chunk.is_dependent:
            return None
        if chunk.group not in self.states:
            seq_len = int(self.sequences[chunk.group]["input_ids"].numel())
            self.states[chunk.group] = GroupState.for_sequence(seq_len, self.kv_state_min_tokens)
        return self.states[chunk.group]

    def context(self, chunk: Chunk) -> ChunkContext:
        sp = None if chunk.shard is None else ulysses_chunk(chunk.shard, chunk.num_tokens, self.sp_process_groups)
        return chunk_context(chunk, self.state(chunk), sp)

    def forward(self, chunk: Chunk, call: Callable[[ChunkContext], object], mode: Mode, offload: bool = False):
        """Runs ``call(context)`` as the forward of ``chunk`` in ``mode``; returns what it returns."""
        if mode is Mode.STATE or (mode is Mode.KEEP and chunk.is_dependent):
            self._rng[chunk] = get_rng()
        ctx = self.context(chunk)
        rng = self._replayed_rng(chunk) if mode is Mode.RECOMPUTE else contextlib.nullcontext()
        with (rng, torch.set_grad_enabled(mode.builds_graph), saved_tensor_hooks(self.meter, offload),
              chunk_scope(ctx)):
            out = call(ctx)
        if self.require_attention and ctx.num_layer_calls == 0:
            raise RuntimeError("the model's attention does not go through transformers' AttentionInterface; "
                               "ChunkFlow cannot train it exactly")
        self.num_forwards += 1
        self.num_recomputes += mode is Mode.RECOMPUTE
        if chunk.is_dependent:
            self.peak_state_bytes = max(self.peak_state_bytes, self.state(chunk).nbytes)
        return out

    def loss(self, head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
             inputs: ChunkInputs) -> torch.Tensor:
        """The chunk's loss (graph kept if the forward built one), added to :attr:`loss_sum` on the device."""
        loss = head_loss(head, hidden, inputs.targets, self.num_loss_tokens, self.loss_pieces, inputs.target_rows)
        self.loss_sum += loss.detach().to(torch.float64)
        return loss

    def backward_done(self, chunk: Chunk) -> None:
        """After a chunk's backward: its RNG state is no longer needed."""
        self._rng.pop(chunk, None)

    def release(self, group: int) -> None:
        """Frees a group's K/V state after its last backward."""
        state = self.states.pop(group)
        self.bytes_moved += state.bytes_moved
        if state.mixers is not None:  # a hybrid's recurrent state: constant in the sample's length
            self.mixer_bytes_per_boundary = max(self.mixer_bytes_per_boundary, state.mixers.bytes_per_boundary)

    @contextlib.contextmanager
    def _replayed_rng(self, key: Hashable):
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
