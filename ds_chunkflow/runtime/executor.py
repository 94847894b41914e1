"""Runs a chunk plan (:mod:`ds_chunkflow.plan.schedule`) on a transformers causal LM.

The executor knows nothing of DeepSpeed: it gets a ``forward_fn`` (the model, or a
DeepSpeed engine) and a ``backward_fn(loss, is_boundary)``. Each instruction type
maps to one method; an unknown instruction is an error.

Loss: every chunk contributes ``sum(CE over its targets) / num_loss_tokens``, where
``num_loss_tokens`` is the global batch's count, fixed before chunking. Summed over
chunks (and ranks) this is exactly the unchunked loss, so the gradients are too. The
model's forward computes no chunk logits (``logits_to_keep=1``): the loss runs on the final
hidden states in ``loss_pieces`` pieces of target rows (:func:`~ds_chunkflow.runtime.chunk.head_loss`).

``graph_hooks`` hear of every graph kept for a later backward (``after_forward(key)``) and of
its backward (``before_backward(key)``): ZeRO-3 needs them when several graphs are alive
(:class:`ds_chunkflow.deepspeed.deepspeed_adapter.Zero3LiveGraphs`).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import torch

from ds_chunkflow.constants import IGNORE_INDEX
from ds_chunkflow.hf.model import OutputHead, final_hidden
from ds_chunkflow.ops.context import ChunkContext, SegmentSpec
from ds_chunkflow.plan.chunking import Chunk
from ds_chunkflow.plan.schedule import (
    Backward,
    EvalForward,
    Forward,
    Instruction,
    PadBackward,
    PadEvalForward,
    PadForward,
    Recompute,
    ReleaseState,
    StateForward,
    Step,
    flatten,
)
from ds_chunkflow.runtime.batch import SequenceDict
from ds_chunkflow.runtime.chunk import ChunkRun, head_loss
from ds_chunkflow.runtime.memory import ActivationMeter, saved_tensor_hooks

BackwardFn = Callable[[torch.Tensor, bool], None]


def no_backward(loss: torch.Tensor, boundary: bool) -> None:
    """The backward of an evaluation executor: its plans have none."""
    raise AssertionError("an evaluation plan has no backward")


@dataclass
class ExecStats:
    """What one plan run did; the engine turns these into metrics."""

    loss: torch.Tensor
    num_forwards: int = 0
    num_backwards: int = 0
    num_recomputes: int = 0
    peak_state_bytes: int = 0
    state_bytes_moved: int = 0
    offloaded_bytes: int = 0
    mixer_state_bytes: int = 0  # a hybrid's recurrent state per sample and chunk boundary (0: no mixers)


class GraphHooks:
    """Told about each graph the executor keeps alive for a later backward; no-op by default."""

    def after_forward(self, key) -> None:
        pass

    def before_backward(self, key) -> None:
        pass


@dataclass
class Executor:
    forward_fn: Callable
    backward_fn: BackwardFn
    sequences: Sequence[SequenceDict]
    num_loss_tokens: int
    device: torch.device
    state_offload_min_tokens: int | None = None
    meter: ActivationMeter = field(default_factory=ActivationMeter)
    pad_token_id: int = 0
    model: torch.nn.Module | None = None
    """The transformers model ``forward_fn`` runs (default: ``forward_fn`` itself)."""
    loss_pieces: int = 1
    """Pieces of the chunked lm_head + CE per chunk (the same on every rank: ZeRO-3 gathers per call)."""
    graph_hooks: GraphHooks = field(default_factory=GraphHooks)
    sp_groups: dict = field(default_factory=dict)
    """Data-parallel ranks of each sequence-parallel block -> its process group (shards need them)."""
    _losses: dict = field(default_factory=dict)
    _pads: collections.deque = field(default_factory=collections.deque)

    def __post_init__(self) -> None:
        self.run_state = ChunkRun(self.sequences, self.device, self.state_offload_min_tokens, self.sp_groups,
                                  self.pad_token_id)
        if self.model is None:
            self.model = self.forward_fn
        self.head = OutputHead(self.model)
        self._num_pads = 0

    def run(self, plan: list[Step]) -> ExecStats:
        instructions = flatten(plan)
        backwards = [i for i, ins in enumerate(instructions) if isinstance(ins, (Backward, PadBackward))]
        self._last_backward = backwards[-1] if backwards else -1
        self.stats = ExecStats(loss=torch.zeros((), dtype=torch.float64))
        offloaded_before = self.meter.offloaded  # the meter may be shared across runs
        for i, ins in enumerate(instructions):
            handler = self._HANDLERS.get(type(ins))
            if handler is None:
                raise TypeError(f"executor has no handler for instruction {ins!r}")
            self._boundary = i == self._last_backward
            handler(self, ins)
        assert not self._losses and not self._pads and not self.run_state.pending, "plan left work pending"
        self.stats.offloaded_bytes = self.meter.offloaded - offloaded_before
        self.stats.state_bytes_moved = self.run_state.bytes_moved
        self.stats.mixer_state_bytes = self.run_state.mixer_bytes_per_boundary
        return self.stats

    # ------------------------------------------------------------------ helpers
    def _call(self, chunk: Chunk, with_loss: bool, offload: bool = False, hooks: bool = True) -> torch.Tensor | None:
        inputs = self.run_state.inputs(chunk)
        ctx = self.run_state.context(chunk)
        with saved_tensor_hooks(self.meter, offload), final_hidden(self.model) as hidden:
            self.forward_fn(input_ids=inputs.input_ids, position_ids=inputs.position_ids, use_cache=False,
                            chunkflow=ctx, logits_to_keep=1)
            if ctx.num_layer_calls == 0:
                raise RuntimeError("the model's attention does not go through transformers' AttentionInterface; "
                                   "ChunkFlow cannot train it exactly")
            self.stats.num_forwards += 1
            if chunk.is_dependent:
                self.stats.peak_state_bytes = max(self.stats.peak_state_bytes, self.run_state.state(chunk).nbytes)
            if not with_loss:
                return None
            loss = head_loss(self.head, hidden[0], inputs.targets, self.num_loss_tokens, self.loss_pieces)
        self.stats.loss += loss.detach().double().cpu()
        if hooks:  # a graph kept for a later backward (not an evaluation forward's)
            self.graph_hooks.after_forward(chunk)
        return loss

    def _backward(self, key, loss: torch.Tensor) -> None:
        self.graph_hooks.before_backward(key)
        self.backward_fn(loss, self._boundary)
        self.stats.num_backwards += 1

    # ------------------------------------------------------------------ instructions
    def _exec_state_forward(self, ins: StateForward) -> None:
        self.run_state.remember_rng(ins.chunk)
        with torch.no_grad():
            self._call(ins.chunk, with_loss=False)

    def _exec_forward(self, ins: Forward) -> None:
        if ins.chunk.is_dependent:
            self.run_state.remember_rng(ins.chunk)
        self._losses[ins.chunk] = self._call(ins.chunk, with_loss=True, offload=ins.offload)

    def _exec_recompute(self, ins: Recompute) -> None:
        self.stats.num_recomputes += 1
        with self.run_state.replayed_rng(ins.chunk):
            self._losses[ins.chunk] = self._call(ins.chunk, with_loss=True)

    def _exec_backward(self, ins: Backward) -> None:
        self.run_state.forget_rng(ins.chunk)
        self._backward(ins.chunk, self._losses.pop(ins.chunk))

    def _pad_call(self, grad: bool, with_loss: bool) -> torch.Tensor | None:
        """The same module calls as a chunk (forward, then the loss pieces), with no targets: a zero loss."""
        ids = torch.full((1, 1), self.pad_token_id, dtype=torch.long, device=self.device)
        ctx = ChunkContext([SegmentSpec(0, 1)])
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()), final_hidden(self.model) as hidden:
            self.forward_fn(input_ids=ids, position_ids=torch.zeros_like(ids), use_cache=False, chunkflow=ctx,
                            logits_to_keep=1)
            self.stats.num_forwards += 1
            if not with_loss:
                return None
            return head_loss(self.head, hidden[0], torch.full_like(ids, IGNORE_INDEX), 1, self.loss_pieces)

    def _exec_pad_forward(self, ins: PadForward) -> None:
        loss = self._pad_call(grad=ins.keep, with_loss=ins.keep)
        if not ins.keep:
            return
        key = ("pad", self._num_pads)
        self._num_pads += 1
        self._pads.append((key, loss))
        self.graph_hooks.after_forward(key)

    def _exec_pad_backward(self, ins: PadBackward) -> None:
        self._backward(*self._pads.popleft())

    def _exec_eval_forward(self, ins: EvalForward) -> None:
        with torch.no_grad():
            self._call(ins.chunk, with_loss=True, hooks=False)

    def _exec_pad_eval_forward(self, ins: PadEvalForward) -> None:
        self._pad_call(grad=False, with_loss=True)

    def _exec_release(self, ins: ReleaseState) -> None:
        self.run_state.release(ins.group)

    _HANDLERS: ClassVar[dict[type[Instruction], Callable]] = {
        StateForward: _exec_state_forward,
        Forward: _exec_forward,
        Recompute: _exec_recompute,
        Backward: _exec_backward,
        PadForward: _exec_pad_forward,
        PadBackward: _exec_pad_backward,
        ReleaseState: _exec_release,
        EvalForward: _exec_eval_forward,
        PadEvalForward: _exec_pad_eval_forward,
    }
