"""Runs a data-parallel rank's chunk plan (:mod:`ds_chunkflow.plan.schedule`) on a transformers causal LM.

The executor knows nothing of DeepSpeed: it gets a ``forward_fn`` (the model, or a
DeepSpeed engine) and a ``backward_fn(loss, is_boundary)``; what a chunk is and how it runs is the
:class:`~ds_chunkflow.runtime.chunk.ChunkRuntime`'s. Each instruction type maps to one method;
an unknown instruction is an error.

Loss: every chunk contributes ``sum(CE over its targets) / num_loss_tokens``, where
``num_loss_tokens`` is the global batch's count, fixed before chunking. Summed over
chunks (and ranks) this is exactly the unchunked loss, so the gradients are too. The
model's forward computes no chunk logits (``logits_to_keep=1``): the loss runs on the final
hidden states in ``loss_pieces`` pieces of target rows (:func:`~ds_chunkflow.runtime.chunk.head_loss`).
The loss stays on the device; :attr:`ExecStats.loss` is the device sum, read once by the caller.

``graph_hooks`` hear of every graph kept for a later backward (``after_forward(key)``) and of
its backward (``before_backward(key)``): ZeRO-3 needs them when several graphs are alive
(:class:`ds_chunkflow.deepspeed.deepspeed_adapter.Zero3LiveGraphs`).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from ds_chunkflow.constants import IGNORE_INDEX
from ds_chunkflow.hf.model import OutputHead, final_hidden
from ds_chunkflow.ops.context import ChunkContext, SegmentSpec
from ds_chunkflow.plan.instructions import BACKWARDS
from ds_chunkflow.plan.schedule import (
    Backward,
    EvalForward,
    Forward,
    JointBackward,
    PadBackward,
    PadEvalForward,
    PadForward,
    Recompute,
    ReleaseState,
    StateForward,
    Step,
    flatten,
)
from ds_chunkflow.runtime.chunk import ChunkRuntime, Mode, head_loss

BackwardFn = Callable[[torch.Tensor, bool], None]
MODES = {Forward: Mode.KEEP, StateForward: Mode.STATE, Recompute: Mode.RECOMPUTE, EvalForward: Mode.EVAL}
TIME_CATEGORY = {Forward: "forward", StateForward: "state_forward", Recompute: "recompute", Backward: "backward",
                 JointBackward: "backward", EvalForward: "forward", PadForward: "lockstep_pad",
                 PadBackward: "lockstep_pad", PadEvalForward: "lockstep_pad", ReleaseState: "other"}
"""Where a step's time goes, per instruction: the backward includes DeepSpeed's gradient reduction hooks (and
under ZeRO-3 the parameter gathers), a sequence-parallel chunk's forward and backward its all-to-alls."""


def no_backward(loss: torch.Tensor, boundary: bool) -> None:
    """The backward of an evaluation executor: its plans have none."""
    raise AssertionError("an evaluation plan has no backward")


@dataclass
class ExecStats:
    """What one plan run did; the engine turns these into metrics."""

    loss: torch.Tensor
    """Sum of the chunk losses, float64 on the device."""
    num_forwards: int = 0
    num_backwards: int = 0
    num_recomputes: int = 0
    peak_state_bytes: int = 0
    state_bytes_moved: int = 0
    offloaded_bytes: int = 0
    mixer_state_bytes: int = 0  # a hybrid's recurrent state per sample and chunk boundary (0: no mixers)
    seconds: dict[str, float] = field(default_factory=dict)
    """Host wall time per kind of instruction (:data:`TIME_CATEGORY`), plus ``other``: the executor's own
    Python between instructions. Exact on the CPU; on CUDA it is launch time unless a call waits for the device."""
    num_instructions: int = 0


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
    runtime: ChunkRuntime
    model: torch.nn.Module | None = None
    """The transformers model ``forward_fn`` runs (default: ``forward_fn`` itself)."""
    graph_hooks: GraphHooks = field(default_factory=GraphHooks)
    _losses: dict = field(default_factory=dict)
    _pads: collections.deque = field(default_factory=collections.deque)

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = self.forward_fn
        self.head = OutputHead(self.model)
        self._num_pads = 0
        self._pad_forwards = 0

    def run(self, plan: list[Step]) -> ExecStats:
        instructions = flatten(plan)
        backwards = [i for i, ins in enumerate(instructions) if isinstance(ins, BACKWARDS)]
        self._last_backward = backwards[-1] if backwards else -1
        rt = self.runtime
        self.stats = ExecStats(loss=rt.loss_sum)
        offloaded_before, forwards_before = rt.meter.offloaded, rt.num_forwards  # a runtime may serve several runs
        recomputes_before = rt.num_recomputes
        seconds = collections.defaultdict(float)
        start = time.perf_counter()
        for i, ins in enumerate(instructions):
            handler = self._HANDLERS.get(type(ins))
            if handler is None:
                raise TypeError(f"executor has no handler for instruction {ins!r}")
            self._boundary = i == self._last_backward
            t = time.perf_counter()
            handler(self, ins)
            seconds[TIME_CATEGORY[type(ins)]] += time.perf_counter() - t
        seconds["other"] += time.perf_counter() - start - sum(seconds.values())
        self.stats.seconds = dict(seconds)
        self.stats.num_instructions = len(instructions)
        assert not self._losses and not self._pads and not rt.pending, "plan left work pending"
        self.stats.loss = rt.loss_sum
        self.stats.num_forwards = rt.num_forwards - forwards_before + self._pad_forwards
        self.stats.num_recomputes = rt.num_recomputes - recomputes_before
        self.stats.peak_state_bytes = rt.peak_state_bytes
        self.stats.offloaded_bytes = rt.meter.offloaded - offloaded_before
        self.stats.state_bytes_moved = rt.bytes_moved
        self.stats.mixer_state_bytes = rt.mixer_bytes_per_boundary
        return self.stats

    # ------------------------------------------------------------------ helpers
    def _model_call(self, inputs, with_loss: bool):
        """``call(context)`` for the runtime: the model's forward on the chunk, then its loss."""

        def call(ctx: ChunkContext) -> torch.Tensor | None:
            with final_hidden(self.model) as hidden:
                self.forward_fn(input_ids=inputs.input_ids, position_ids=inputs.position_ids, use_cache=False,
                                chunkflow=ctx, logits_to_keep=1)
                return self.runtime.loss(self.head, hidden[0], inputs) if with_loss else None

        return call

    def _forward(self, ins) -> torch.Tensor | None:
        mode = MODES[type(ins)]
        inputs = self.runtime.inputs(ins.chunk)
        return self.runtime.forward(ins.chunk, self._model_call(inputs, with_loss=mode is not Mode.STATE), mode,
                                    offload=getattr(ins, "offload", False))

    def _backward(self, keys, loss: torch.Tensor) -> None:
        """One backward call of ``loss``, the sum of the losses of the graphs kept under ``keys``."""
        for key in keys:
            self.graph_hooks.before_backward(key)
        self.backward_fn(loss, self._boundary)
        self.stats.num_backwards += 1

    # ------------------------------------------------------------------ instructions
    def _exec_state_forward(self, ins: StateForward) -> None:
        self._forward(ins)

    def _exec_forward(self, ins: Forward | Recompute) -> None:
        self._losses[ins.chunk] = self._forward(ins)
        self.graph_hooks.after_forward(ins.chunk)  # a graph kept for a later backward

    def _exec_backward(self, ins: Backward) -> None:
        self.runtime.backward_done(ins.chunk)
        self._backward([ins.chunk], self._losses.pop(ins.chunk))

    def _exec_joint_backward(self, ins: JointBackward) -> None:
        """One backward call for standalone chunks (planned only where forwards are not collective: the
        ZeRO-3 graph hooks count one graph per backward)."""
        for chunk in ins.chunks:
            self.runtime.backward_done(chunk)
        losses = [self._losses.pop(c) for c in ins.chunks]
        loss = losses[0]
        for more in losses[1:]:
            loss = loss + more
        self._backward(ins.chunks, loss)

    def _exec_eval_forward(self, ins: EvalForward) -> None:
        self._forward(ins)

    def _pad_call(self, grad: bool, with_loss: bool) -> torch.Tensor | None:
        """The same module calls as a chunk (forward, then the loss pieces), with no targets: a zero loss."""
        ids = torch.full((1, 1), self.runtime.pad_token_id, dtype=torch.long, device=self.runtime.device)
        ctx = ChunkContext([SegmentSpec(0, 1)])
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()), final_hidden(self.model) as hidden:
            self.forward_fn(input_ids=ids, position_ids=torch.zeros_like(ids), use_cache=False, chunkflow=ctx,
                            logits_to_keep=1)
            self._pad_forwards += 1
            if not with_loss:
                return None
            no_rows = torch.zeros(0, dtype=torch.long, device=ids.device)
            return head_loss(self.head, hidden[0], torch.full_like(ids, IGNORE_INDEX), 1, self.runtime.loss_pieces,
                             no_rows)

    def _exec_pad_forward(self, ins: PadForward) -> None:
        loss = self._pad_call(grad=ins.keep, with_loss=ins.keep)
        if not ins.keep:
            return
        key = ("pad", self._num_pads)
        self._num_pads += 1
        self._pads.append((key, loss))
        self.graph_hooks.after_forward(key)

    def _exec_pad_backward(self, ins: PadBackward) -> None:
        key, loss = self._pads.popleft()
        self._backward([key], loss)

    def _exec_pad_eval_forward(self, ins: PadEvalForward) -> None:
        self._pad_call(grad=False, with_loss=True)

    def _exec_release(self, ins: ReleaseState) -> None:
        self.runtime.release(ins.group)

    _HANDLERS: ClassVar[dict[type, Callable]] = {
        StateForward: _exec_state_forward,
        Forward: _exec_forward,
        Recompute: _exec_forward,
        Backward: _exec_backward,
        JointBackward: _exec_joint_backward,
        PadForward: _exec_pad_forward,
        PadBackward: _exec_pad_backward,
        ReleaseState: _exec_release,
        EvalForward: _exec_eval_forward,
        PadEvalForward: _exec_pad_eval_forward,
    }

