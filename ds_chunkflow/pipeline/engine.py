"""ChunkFlowPipelineEngine: DeepSpeed's PipelineEngine running the state-aware 1F1B schedule.

DeepSpeed's ``train_batch`` hard-codes ``TrainSchedule`` and a data iterator; this
subclass plans the global batch into chunks (the same layout on every rank), takes its
pipeline replica's share, and executes :class:`ChunkFlowTrainSchedule` with handlers for
the extra instructions:

    LoadMicroBatch    chunk tensors into the buffer (first stage: ids/positions, last: targets)
    ForwardPass       forward with autograd; the last stage keeps one loss per buffer
    StateForward      forward without a graph: only this stage's K/V state of the chunk
    RecomputeForward  forward again from the RNG state of the StateForward, with autograd
    BackwardPass      DeepSpeed's backward on the buffer; K/V gradients flow through the state

Each stage keeps the K/V state of its own layers; the chunk being run reaches the layers
through the module's :class:`~ds_chunkflow.pipeline.model.ChunkSlot`.
"""

from __future__ import annotations

import time
import warnings
from types import MethodType
from typing import Sequence

import torch
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine

from ..attention import use_chunkflow_attention
from ..batch import SequenceDict, materialize, shifted_targets
from ..distributed import all_reduce
from ..engine import ChunkFlowMixin
from ..executor import chunk_context, get_rng, set_rng
from ..memory import peak_rss_bytes
from ..monitor import step_metrics
from ..plan import plan_batch
from ..state import GroupState
from .schedule import ChunkFlowTrainSchedule, RecomputeForward, StateForward


class ChunkFlowPipelineEngine(ChunkFlowMixin, PipelineEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slot = self.module.chunk_slot
        if self.chunkflow_config.offload.activations != "none":
            warnings.warn("chunkflow.offload.activations has no effect in pipeline mode: chunks beyond keep_chunks "
                          "are recomputed", stacklevel=2)

    # ------------------------------------------------------------------ step
    def train_batch(self, sequences: Sequence[SequenceDict] | None = None, data_iter=None) -> torch.Tensor:
        """One optimizer step over a global batch (the same list on every rank); returns its loss."""
        if data_iter is not None:
            raise TypeError("ChunkFlowPipelineEngine.train_batch takes a list of sequences, not a data iterator")
        start = time.perf_counter()
        sequences = self.next_global_batch() if sequences is None else sequences
        cf = self.chunkflow_config
        dp_world = self.grid.get_data_parallel_world_size()
        cost = self._cost_model()
        batch = plan_batch(sequences, chunk_size=cf.chunk_size, keep_chunks=cf.keep_chunks, num_ranks=dp_world,
                           cost=cost, max_seq_len=cf.max_seq_len, on_overlong=cf.on_overlong)
        share = batch.shares[self.grid.get_data_parallel_rank()]
        self._chunks = [c for g in share.groups for c in g] + share.standalone
        self._sequences = batch.sequences
        self._targets = [shifted_targets(s["labels"]) for s in batch.sequences]
        self._states: dict[int, GroupState] = {}
        self._rng: dict[int, tuple] = {}
        self._losses: dict[int, torch.Tensor] = {}
        self._loss_sum = 0.0
        self._slot.num_loss_tokens = batch.num_loss_tokens
        self._slot.loss_scale = float(dp_world)  # DeepSpeed averages gradients over replicas
        sched = ChunkFlowTrainSchedule(self._chunks, stages=self.num_stages, stage_id=self.stage_id,
                                       keep_chunks=cf.keep_chunks, costs=[cost.chunk_cost(c) for c in self._chunks])
        self.module.train()
        with use_chunkflow_attention(self.module.hf_config):
            self._exec_schedule(sched)
        mine = self._loss_sum if self.is_last_stage() else 0.0
        loss, = all_reduce([mine], "sum", None, self.device)  # sum over replicas' last stages
        self.agg_train_loss = torch.tensor(loss)
        self._write_metrics(step_metrics(batch, loss, time.perf_counter() - start, peak_rss_bytes()))
        return self.agg_train_loss

    def _exec_schedule(self, pipe_schedule):
        self._reserve_pipe_buffers(pipe_schedule.num_pipe_buffers())
        self.fwd_outputs = []
        for step_cmds in pipe_schedule:
            for cmd in step_cmds:
                handler = self._INSTRUCTION_MAP.get(type(cmd))
                if handler is None:
                    raise RuntimeError(f"{type(self).__name__} does not understand instruction {cmd!r}")
                self._cmd = cmd
                MethodType(handler, self)(**cmd.kwargs)

    # ------------------------------------------------------------------ instructions
    def _chunk(self):
        return self._chunks[self._cmd.micro_batch]

    def _state(self, chunk) -> GroupState | None:
        if not chunk.is_dependent:
            return None
        if chunk.group not in self._states:
            seq_len = int(self._sequences[chunk.group]["input_ids"].numel())
            self._states[chunk.group] = GroupState.for_sequence(seq_len,
                                                                self.chunkflow_config.offload.kv_state_min_tokens)
        return self._states[chunk.group]

    def _exec_load_chunk(self, buffer_id):
        inputs = materialize(self._chunk(), self._sequences, self._targets, device=self.device)
        if self.is_first_stage():
            self.pipe_buffers["inputs"][buffer_id] = (inputs.input_ids, inputs.position_ids)
        if self.is_last_stage():
            self.pipe_buffers["labels"][buffer_id] = inputs.targets

    def _run_forward(self, buffer_id, grad: bool):
        chunk = self._chunk()
        self._slot.ctx = chunk_context(chunk, self._state(chunk))
        # a copy: the buffer itself is the leaf whose .grad SendGrad ships upstream
        inputs = tuple(t.clone() for t in self.pipe_buffers["inputs"][buffer_id])
        with torch.set_grad_enabled(grad):
            outputs = super(PipelineEngine, self).forward(inputs)
        self.pipe_buffers["outputs"][buffer_id] = outputs
        if grad and self.is_last_stage():
            loss = self.module.loss_fn(outputs, self.pipe_buffers["labels"][buffer_id])
            self._losses[buffer_id] = loss
            self._loss_sum += loss.item() / self._slot.loss_scale

    def _exec_chunk_forward(self, buffer_id):
        if self._chunk().is_dependent:
            self._rng[self._cmd.micro_batch] = get_rng()
        self._run_forward(buffer_id, grad=True)

    def _exec_state_forward(self, buffer_id, micro_batch=None):
        self._rng[self._cmd.micro_batch] = get_rng()
        self._run_forward(buffer_id, grad=False)

    def _exec_recompute(self, buffer_id, micro_batch=None):
        current = get_rng()
        set_rng(self._rng[self._cmd.micro_batch])
        try:
            self._run_forward(buffer_id, grad=True)
        finally:
            set_rng(current)

    def _exec_chunk_backward(self, buffer_id):
        chunk = self._chunk()
        if self.is_last_stage():
            self.loss = self._losses.pop(buffer_id)
        super()._exec_backward_pass(buffer_id)
        self._rng.pop(self._cmd.micro_batch, None)
        if chunk.is_dependent and chunk.index == 0:  # the group's last backward
            del self._states[chunk.group]

    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        ds_schedule.LoadMicroBatch: _exec_load_chunk,
        ds_schedule.ForwardPass: _exec_chunk_forward,
        ds_schedule.BackwardPass: _exec_chunk_backward,
        StateForward: _exec_state_forward,
        RecomputeForward: _exec_recompute,
    }
