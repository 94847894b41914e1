"""DeepSpeed pipeline schedule for ChunkFlow's state-aware 1F1B.

:func:`~ds_chunkflow.plan.planner.plan_stages` fixes every stage's compute order (the same plan
the simulator times); this module turns one stage's order into DeepSpeed instructions:

    F -> ForwardPass        S -> StateForwardPass        R -> RecomputeForwardPass      B -> BackwardPass

preceded by ``LoadMicroBatch`` at the first forward of a chunk on the first and last stages,
and surrounded by the sends and receives of the neighbouring stages. A group of 3 chunks with
K=1 on a middle stage (stage 0 has no Recv*, the last stage no RecvGrad / SendActivation)::

    RecvActivation StateForwardPass SendActivation      chunk 0: state only
    RecvActivation StateForwardPass SendActivation      chunk 1: state only
    RecvActivation ForwardPass  SendActivation      chunk 2: kept
    RecvGrad BackwardPass SendGrad                  chunk 2
    RecvActivation RecomputeForwardPass SendActivation  chunk 1 again, through the whole pipeline
    RecvGrad BackwardPass SendGrad                  chunk 1
    ...                                             chunk 0 likewise

Where sends and receives go (derived). Every message between neighbouring stages gets a time
``tau`` from the plan's timeline, and each stage issues it at its first op boundary at or
after ``tau``, in ``(tau, ...)`` order:

* activation: ``tau`` = end of the forward that produces it (sent as soon as it exists); for a
  recompute not before the consumer's state-only forward of that chunk (same buffer);
* gradient: ``tau`` = start of the backward that consumes it. DeepSpeed receives gradients
  into one shared buffer (``grad_layer``), so ``RecvGrad`` must sit right before its
  ``BackwardPass``.

Both stages of a link therefore see the same messages in the same order, and blocking
send/receive pairs match one to one. On a line of stages that rules out deadlock: a stage
blocked on a link whose peer is not at that message has a peer blocked on its *other* link,
and the chain must end at the first or last stage, which has only one link.

Buffers: a chunk holds a buffer from its first instruction (load or receive) to its last
(``SendGrad`` or the backward on stage 0), kept or not: stage 0 recomputes from the inputs it
loaded once, and the last stage keeps the labels. Buffers hold boundary tensors only; the
activation memory that matters is the autograd graph of F/R chunks in flight
(``SimResult.peak_in_flight``). Ids are reused lowest first.

Every yielded buffer instruction carries ``micro_batch`` in its ``kwargs``: the index into
``ChunkFlowTrainSchedule.chunks``, i.e. which chunk and which K/V state it belongs to. (So
DeepSpeed's stock send/receive handlers, which take only ``buffer_id``, need the adapter of
:class:`~ds_chunkflow.pipeline.engine.ChunkFlowPipelineEngine`.)
"""

from __future__ import annotations

from collections.abc import Sequence

from deepspeed.runtime.pipe.schedule import (
    BackwardPass,
    BufferOpInstruction,
    ForwardPass,
    LoadMicroBatch,
    OptimizerStep,
    PipeInstruction,
    PipeSchedule,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    ReduceTiedGrads,
    SendActivation,
    SendGrad,
)

from ds_chunkflow.plan.chunking import CostModel
from ds_chunkflow.plan.instructions import Backward, Forward, Recompute, StateForward
from ds_chunkflow.plan.planner import BACKWARD, FORWARD, RECOMPUTE, StagePlan, phase, plan_stages


class StateForwardPass(BufferOpInstruction):
    """Forward a dependent chunk whose activations are not kept: only its K/V state is.

    Roughly:

    .. code-block:: python

        with torch.no_grad():
            buffers['outputs'][buffer_id] = forward(buffers['inputs'][buffer_id], state=kv[group])
        # kv[group] now also holds this chunk's keys and values; no autograd graph is kept
    """

    def __init__(self, buffer_id, micro_batch):
        super().__init__(buffer_id, micro_batch=micro_batch)


class RecomputeForwardPass(BufferOpInstruction):
    """Forward a chunk that ran as :class:`StateForwardPass` again, with autograd, before its backward.

    Roughly:

    .. code-block:: python

        # stage 0 reuses the inputs it loaded once; later stages have just received them again
        inputs = buffers['inputs'][buffer_id]
        buffers['outputs'][buffer_id] = forward(inputs, state=kv[group][:chunk.offset])
        # the following BackwardPass adds the K/V gradient that later chunks left in the state
    """

    def __init__(self, buffer_id, micro_batch):
        super().__init__(buffer_id, micro_batch=micro_batch)


_COMPUTE = {Forward: ForwardPass, StateForward: StateForwardPass, Recompute: RecomputeForwardPass,
            Backward: BackwardPass}


def _comm_items(plan_: StagePlan, num_stages: int, s: int) -> list[tuple[tuple, type, int]]:
    """``(sort key, instruction class, micro_batch)`` of every send/receive of stage ``s``.

    The sort key ``(tau, 0 for activations / 1 for gradients, micro_batch, phase)`` is the
    same on both ends of a message.
    """
    start: dict[tuple[int, str, int], float] = {}
    end: dict[tuple[int, str, int], float] = {}
    for t in (s - 1, s, s + 1):
        for a, b, op in (plan_.timeline[t] if 0 <= t < num_stages else ()):
            start[(t, phase(op), plan_.micro_batch[op.chunk])] = a
            end[(t, phase(op), plan_.micro_batch[op.chunk])] = b
    items = []
    for _, _, op in plan_.timeline[s]:
        mb, ph = plan_.micro_batch[op.chunk], phase(op)
        if ph == BACKWARD:
            if s > 0:
                items.append(((start[(s - 1, BACKWARD, mb)], 1, mb, ph), SendGrad, mb))
            if s < num_stages - 1:
                items.append(((start[(s, BACKWARD, mb)], 1, mb, ph), RecvGrad, mb))
        else:
            if s < num_stages - 1:
                items.append(((_activation_tau(end, s, ph, mb), 0, mb, ph), SendActivation, mb))
            if s > 0:
                items.append(((_activation_tau(end, s - 1, ph, mb), 0, mb, ph), RecvActivation, mb))
    return sorted(items, key=lambda it: it[0])


def _activation_tau(end: dict, producer: int, ph: str, mb: int) -> float:
    """When the activation of ``mb`` from ``producer`` to ``producer + 1`` changes hands.

    A recompute's input lands in the buffer that held the chunk's first input, so it must not
    arrive before the consumer's state-only forward has used that: a lagging consumer may still
    be at the group's state-only forwards when the producer recomputes.
    """
    tau = end[(producer, ph, mb)]
    return max(tau, end[(producer + 1, FORWARD, mb)]) if ph == RECOMPUTE else tau


def stage_steps(plan_: StagePlan, num_stages: int, stage_id: int) -> tuple[list[list[PipeInstruction]], int]:
    """Instructions of one stage, one step per compute op plus a final step; and the buffer count."""
    items = _comm_items(plan_, num_stages, stage_id)
    loads = stage_id in (0, num_stages - 1)
    raw: list[list[tuple[type, int]]] = []
    k = 0
    for a, _, op in plan_.timeline[stage_id]:
        step = []
        while k < len(items) and items[k][0][0] <= a:  # issued at the first boundary at/after tau
            step.append(items[k][1:])
            k += 1
        # RecvGrad last: only other-link messages can share its tau, so link orders are unchanged
        step.sort(key=lambda it: it[0] is RecvGrad)
        mb = plan_.micro_batch[op.chunk]
        if loads and isinstance(op, (Forward, StateForward)):
            step.append((LoadMicroBatch, mb))
        raw.append(step + [(_COMPUTE[type(op)], mb, getattr(op, "offload", False))])
    raw.append([it[1:] for it in items[k:]])
    buffer_of, num_buffers = _assign_buffers(raw)
    steps = [[_make(buffer_of[(i, j)], *item) for j, item in enumerate(step)] for i, step in enumerate(raw)]
    steps[-1] += [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]
    return steps, num_buffers


def _assign_buffers(raw: list[list[tuple]]) -> tuple[dict[tuple[int, int], int], int]:
    """Lowest free buffer id from a chunk's first instruction to its last one."""
    flat = [(i, j, item[1]) for i, step in enumerate(raw) for j, item in enumerate(step)]
    last = {mb: n for n, (_, _, mb) in enumerate(flat)}
    held: dict[int, int] = {}
    free: list[int] = []
    out: dict[tuple[int, int], int] = {}
    num = 0
    for n, (i, j, mb) in enumerate(flat):
        if mb not in held:
            if free:
                held[mb] = min(free)
                free.remove(held[mb])
            else:
                held[mb], num = num, num + 1
        out[(i, j)] = held[mb]
        if last[mb] == n:
            free.append(held.pop(mb))
    return out, max(num, 1)


def _make(buffer_id: int, cls: type, micro_batch: int, offload: bool = False) -> PipeInstruction:
    """``ForwardPass`` of an offloaded chunk carries ``offload=True`` (its saved tensors go to the CPU)."""
    if offload:
        return cls(buffer_id, micro_batch=micro_batch, offload=True)
    return cls(buffer_id, micro_batch=micro_batch)


def default_costs(chunks: Sequence) -> list[float]:
    """Per-chunk forward cost for planning: :class:`CostModel` (attention included) for
    :class:`~ds_chunkflow.plan.chunking.Chunk`, else ``num_tokens``."""
    cost = CostModel()
    return [cost.chunk_cost(c) if hasattr(c, "segments") else float(c.num_tokens) for c in chunks]


class ChunkFlowTrainSchedule(PipeSchedule):
    """State-aware 1F1B over the chunks of one global batch (one micro-batch per chunk).

    Args:
        micro_batches: chunk descriptors (``chunking.Chunk`` or anything with ``group``
            (None if standalone), ``index``, ``count``, ``num_tokens``); micro-batch ``i`` is
            ``micro_batches[i]``. Every rank must pass the same list.
        stages, stage_id: as for DeepSpeed's ``TrainSchedule``.
        keep_chunks: K, chunks of a group whose activations are kept (the rest are recomputed).
        costs: per-chunk forward cost for planning (default :func:`default_costs`).
        strategy, search_iters: forward-sequence choice, see :func:`~ds_chunkflow.plan.planner.plan_stages`.
        offload: activation offload (:func:`~ds_chunkflow.plan.planner.offload_pass`): chunks beyond
            ``keep_chunks`` are forwarded once with their saved tensors on the CPU instead of recomputed.

    The data iterator must yield chunks in :attr:`load_order` (the order of ``LoadMicroBatch``
    on the first and the last stage), which may differ from the list order.
    """

    def __init__(self, micro_batches: Sequence, stages: int, stage_id: int, keep_chunks: int = 1,
                 costs: Sequence[float] | None = None, strategy: str = "auto", search_iters: int = 0,
                 offload: bool = False):
        super().__init__(len(micro_batches), stages, stage_id)
        self.chunks = list(micro_batches)
        self.keep_chunks = keep_chunks
        costs = list(costs) if costs is not None else default_costs(self.chunks)
        self.plan = plan_stages(self.chunks, stages, keep_chunks, costs, strategy, search_iters=search_iters,
                                offload=offload)
        self._steps, self._num_buffers = stage_steps(self.plan, stages, stage_id)

    @property
    def load_order(self) -> list[int]:
        """Micro-batch ids in the order the first and last stages load them."""
        return [self.plan.micro_batch[op.chunk] for op in self.plan.forward if isinstance(op, (Forward, StateForward))]

    def steps(self):
        """Yield this stage's instruction lists (fresh objects every pass)."""
        for step in self._steps:
            yield [_copy(cmd) for cmd in step]

    def num_pipe_buffers(self) -> int:
        """Most chunks holding a buffer at once on this stage (see the module docstring)."""
        return self._num_buffers


def _copy(cmd: PipeInstruction) -> PipeInstruction:
    new = type(cmd).__new__(type(cmd))
    new.__dict__.update(cmd.__dict__)
    return new
