"""ChunkFlowPipelineEngine: DeepSpeed's PipelineEngine running the state-aware 1F1B schedule.

DeepSpeed's ``train_batch`` hard-codes ``TrainSchedule`` and a data iterator; this
subclass plans the global batch into chunks (the same layout on every rank), takes its
pipeline replica's share, and executes :class:`ChunkFlowTrainSchedule` with handlers for
the extra instructions:

    LoadMicroBatch    chunk tensors into the buffer (first stage: ids/positions, last: targets)
    ForwardPass       forward with autograd; the last stage keeps one loss per buffer
                      (``offload=True``: the saved tensors go to the CPU, activation offload)
    StateForwardPass  forward without a graph: only this stage's K/V state of the chunk
    RecomputeForwardPass  forward again from the RNG state of the StateForwardPass, with autograd
    BackwardPass      DeepSpeed's backward on the buffer; K/V gradients flow through the state

Each instruction names its chunk (``micro_batch`` in its kwargs, the index into the chunk
list). Every chunk runs through the same :class:`~ds_chunkflow.runtime.chunk.ChunkRuntime` as in
data parallelism (inputs, K/V and mixer state, RNG replay, offload, the chunked loss); each stage
keeps the state of its own layers; the chunk being run reaches the attention layers through the
module's :class:`~ds_chunkflow.pipeline.model.ChunkSlot` and the recurrent mixers through the
runtime's chunk scope.

Errors. Every rank plans the whole global batch; a planning error (a sample over
``max_seq_len``, an empty batch) is agreed over all ranks of the pipeline, and so is the
batch itself (same size on every rank), so every stage raises the same way and none is
left waiting. An exception while the schedule runs cannot be agreed on: its neighbour may
be blocked in a receive from this stage. So the failing rank prints its rank, the message
and the traceback to stderr and ends its process with exit code 1 (``os._exit``, no
cleanup that could block on a collective); its sockets close, the neighbours' receives fail
and they end the same way, and the launcher (deepspeed, torchrun) stops the rest. A single
process (world size 1) re-raises instead.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from types import MethodType
from typing import Sequence

import torch
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine

from ds_chunkflow.deepspeed.distributed import all_reduce
from ds_chunkflow.deepspeed.engine import ChunkFlowMixin
from ds_chunkflow.deepspeed.monitor import step_metrics
from ds_chunkflow.hf.model import enable_recompute
from ds_chunkflow.pipeline.schedule import ChunkFlowTrainSchedule, RecomputeForwardPass, StateForwardPass
from ds_chunkflow.runtime.batch import SequenceDict
from ds_chunkflow.runtime.chunk import ChunkRuntime, Mode, hooks
from ds_chunkflow.runtime.executor import ExecStats
from ds_chunkflow.runtime.memory import peak_rss_bytes

_STOCK_BUFFER_OPS = (ds_schedule.SendActivation, ds_schedule.RecvActivation, ds_schedule.SendGrad,
                     ds_schedule.RecvGrad)


def _buffer_only(handler):
    """A stock DeepSpeed handler (``buffer_id`` only) for an instruction that also names its chunk."""

    def run(self, buffer_id, micro_batch):
        return handler(self, buffer_id)

    return run


def _terminate(rank: int) -> None:
    """Ends this process after an error inside the schedule; see the module docstring."""
    sys.stderr.write(f"ds_chunkflow pipeline: rank {rank} failed while running the pipeline schedule; ending this "
                     "process (exit code 1) so that no other stage waits on it\n" + traceback.format_exc())
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


class ChunkFlowPipelineEngine(ChunkFlowMixin, PipelineEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slot = self.module.chunk_slot
        self.guard_report = self.module.guard_report
        self.num_recomputed_layers = enable_recompute(self.module, self.chunkflow_config.recompute_layers)

    # ------------------------------------------------------------------ step
    def train_batch(self, sequences: Sequence[SequenceDict] | None = None, data_iter=None) -> torch.Tensor:
        """One optimizer step over a global batch (the same list on every rank); returns its loss."""
        if data_iter is not None:
            raise TypeError("ChunkFlowPipelineEngine.train_batch takes a list of sequences, not a data iterator")
        start = time.perf_counter()
        sequences = self.next_global_batch() if sequences is None else sequences
        cf = self.chunkflow_config
        cost = self._cost_model()
        # every stage and replica plans the whole batch; errors and the batch itself agreed over all ranks
        batch = self._plan_agreed(sequences, self.grid.get_data_parallel_world_size(), cost, group=None)
        share = batch.shares[self.grid.get_data_parallel_rank()]
        self._chunks = [c for g in share.groups for c in g] + share.standalone
        self._runtime = ChunkRuntime.from_config(batch.sequences, cf, self.device, batch.num_loss_tokens,
                                                 require_attention=False)  # a stage may hold no attention layer
        self._losses: dict[int, torch.Tensor] = {}
        self._loss_scale = float(self.grid.get_data_parallel_world_size())  # DeepSpeed averages over replicas
        sched = ChunkFlowTrainSchedule(self._chunks, stages=self.num_stages, stage_id=self.stage_id,
                                       keep_chunks=cf.keep_chunks, costs=[cost.chunk_cost(c) for c in self._chunks],
                                       offload=cf.offload.activations == "far")
        self.module.train()
        self._run_schedule(sched)
        mine = self._runtime.loss_sum.item() if self.is_last_stage() else 0.0  # the step's one read of the loss
        # the loss summed over the replicas' last stages, the counters over every rank: one all-reduce
        loss, moved, offloaded = all_reduce([mine, self._runtime.bytes_moved, self._runtime.meter.offloaded], "sum",
                                            None, self.device)
        self.agg_train_loss = torch.tensor(loss)
        stats = ExecStats(loss=torch.tensor(loss), state_bytes_moved=int(moved), offloaded_bytes=int(offloaded),
                          num_recomputes=self._runtime.num_recomputes)
        self._write_metrics(step_metrics(batch, loss, time.perf_counter() - start, peak_rss_bytes(), stats))
        return self.agg_train_loss

    def _run_schedule(self, sched: ChunkFlowTrainSchedule) -> None:
        try:
            with hooks(self.module, self.module.hf_config, from_forward_kwargs=False):
                self._exec_schedule(sched)
        except Exception:
            if self.world_size == 1:
                raise
            _terminate(self.global_rank)

    def _exec_schedule(self, pipe_schedule):
        self._reserve_pipe_buffers(pipe_schedule.num_pipe_buffers())
        self.fwd_outputs = []
        for step_cmds in pipe_schedule:
            for cmd in step_cmds:
                handler = self._INSTRUCTION_MAP.get(type(cmd))
                if handler is None:
                    raise RuntimeError(f"{type(self).__name__} does not understand instruction {cmd!r}")
                MethodType(handler, self)(**cmd.kwargs)

    # ------------------------------------------------------------------ instructions
    def _exec_load_chunk(self, buffer_id, micro_batch):
        inputs = self._runtime.inputs(self._chunks[micro_batch])
        if self.is_first_stage():
            self.pipe_buffers["inputs"][buffer_id] = (inputs.input_ids, inputs.position_ids)
        if self.is_last_stage():
            self.pipe_buffers["labels"][buffer_id] = inputs  # targets and their rows, for the chunk's loss

    def _run_forward(self, buffer_id, micro_batch, mode: Mode, offload: bool = False):
        def call(ctx):
            self._slot.ctx = ctx
            # a copy: the buffer itself is the leaf whose .grad SendGrad ships upstream
            inputs = tuple(t.clone() for t in self.pipe_buffers["inputs"][buffer_id])
            outputs = super(PipelineEngine, self).forward(inputs)
            self.pipe_buffers["outputs"][buffer_id] = outputs
            if mode.builds_graph and self.is_last_stage():
                loss = self._runtime.loss(self._slot.head.logits, outputs, self.pipe_buffers["labels"][buffer_id])
                self._losses[buffer_id] = loss * self._loss_scale

        self._runtime.forward(self._chunks[micro_batch], call, mode, offload)

    def _exec_chunk_forward(self, buffer_id, micro_batch, offload=False):
        self._run_forward(buffer_id, micro_batch, Mode.KEEP, offload)

    def _exec_state_forward(self, buffer_id, micro_batch):
        self._run_forward(buffer_id, micro_batch, Mode.STATE)

    def _exec_recompute(self, buffer_id, micro_batch):
        self._run_forward(buffer_id, micro_batch, Mode.RECOMPUTE)

    def _exec_chunk_backward(self, buffer_id, micro_batch):
        chunk = self._chunks[micro_batch]
        if self.is_last_stage():
            self.loss = self._losses.pop(buffer_id)
        super()._exec_backward_pass(buffer_id)
        self._runtime.backward_done(chunk)
        if chunk.is_dependent and chunk.index == 0:  # the group's last backward
            self._runtime.release(chunk.group)

    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        **{cls: _buffer_only(PipelineEngine._INSTRUCTION_MAP[cls]) for cls in _STOCK_BUFFER_OPS},
        ds_schedule.LoadMicroBatch: _exec_load_chunk,
        ds_schedule.ForwardPass: _exec_chunk_forward,
        ds_schedule.BackwardPass: _exec_chunk_backward,
        StateForwardPass: _exec_state_forward,
        RecomputeForwardPass: _exec_recompute,
    }
