"""State-aware chunk scheduling (ChunkFlow Algorithm 2) as data: one data-parallel rank's plan.

The order is the one planner's (:mod:`ds_chunkflow.plan.planner`) on one stage with one chunk in
flight, in the instruction vocabulary of :mod:`ds_chunkflow.plan.instructions`; this module cuts it
into steps (:func:`as_steps`) and passes over the steps: lock-step alignment of ranks (:func:`align`).
Offload is a pass over the forward sequence (:func:`~ds_chunkflow.plan.planner.offload_pass`).

A plan is a list of :class:`Step`; a step is a few instructions in a fixed shape::

    pre  : StateForward*            forwards without a graph (only fill the K/V state)
    fwd  : (Forward | Recompute)+   forwards that keep activations
    bwd  : Backward+                in reverse order of fwd
    post : ReleaseState*            bookkeeping, no model call

For one dependent group of N chunks and K = keep_chunks::

    N <= K : [F0 .. F(N-1) | B(N-1) .. B0]
    N >  K : [S0 .. S(N-K-1), F(N-K) .. F(N-1) | B(N-1) .. B(N-K)]
             [R(N-K-1) | B(N-K-1)]  ...  [R0 | B0]        (descending: exact gradients)

A standalone chunk is ``[F | B]``. With activation offload, the chunks that would be
recomputed are instead forwarded once with their saved tensors moved to the CPU.

Model calls are collective under ZeRO-2/3 (parameter gathers, gradient reduction), so
every data-parallel rank must issue the same sequence of collective calls.
:func:`align` pads the plans with one-token ``PadForward``/``PadBackward`` calls: step by step
until every rank has the same shape where forwards are collective (ZeRO-3),
else only at the end, until every rank has the same number of backwards; either way the last
backward is the same call on every rank (the gradient-accumulation boundary).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ds_chunkflow.plan.chunking import Chunk, RankShare
from ds_chunkflow.plan.instructions import (
    Backward,
    EvalForward,
    Forward,
    Instruction,
    JointBackward,
    PadBackward,
    PadEvalForward,
    PadForward,
    Recompute,
    ReleaseState,
    StateForward,
)
from ds_chunkflow.plan.planner import backward_sequence, given_sequence, offload_pass, stage_order

__all__ = ["Backward", "EvalForward", "Forward", "Instruction", "JointBackward", "PadBackward", "PadEvalForward",
           "PadForward", "PlanStats", "Recompute", "ReleaseState", "StateForward", "Step", "align", "align_eval",
           "build_eval_plan", "build_plan", "flatten", "group_steps", "join_backwards", "plan_stats", "rank_groups",
           "rank_order"]


@dataclass
class Step:
    pre: list[Instruction] = field(default_factory=list)
    fwd: list[Instruction] = field(default_factory=list)
    bwd: list[Instruction] = field(default_factory=list)
    post: list[Instruction] = field(default_factory=list)

    def instructions(self) -> list[Instruction]:
        return self.pre + self.fwd + self.bwd + self.post


def rank_order(chunks: list[Chunk], keep_chunks: int, offload: bool = False) -> list[Instruction]:
    """One rank's compute order: the planner's one-stage case (one chunk in flight), chunks in the given order."""
    fwd = given_sequence(chunks, keep_chunks)
    if offload:
        fwd = offload_pass(fwd)
    return stage_order(fwd, backward_sequence(fwd, chunks), limit=1)


def as_steps(order: list[Instruction]) -> list[Step]:
    """Cuts a one-stage compute order into steps (a run of forwards, then a run of backwards) and adds each
    group's ReleaseState after its last backward (the backward of its chunk 0)."""
    steps: list[Step] = []
    for ins in order:
        if not isinstance(ins, Backward) and (not steps or steps[-1].bwd):
            steps.append(Step())
        step = steps[-1]
        if isinstance(ins, StateForward):
            if step.fwd:
                raise AssertionError(f"a state-only forward after a kept one in a step: {order}")
            step.pre.append(ins)
        elif isinstance(ins, Backward):
            step.bwd.append(ins)
            if ins.chunk.is_dependent and ins.chunk.index == 0:
                step.post.append(ReleaseState(ins.chunk.group))
        else:
            step.fwd.append(ins)
    return steps


def group_steps(chunks: list[Chunk], keep_chunks: int, offload: bool = False) -> list[Step]:
    """Algorithm 2 for one dependent group (chunks in ascending index order)."""
    return as_steps(rank_order(chunks, keep_chunks, offload))


def rank_groups(share: RankShare) -> list[list[Chunk]]:
    """A rank's dependent groups in plan order: its sequence-parallel groups (in the share's order, which
    the other ranks of each group share), then its own groups, longest first."""
    return share.sp_groups + sorted(share.groups, key=lambda g: (-len(g), g[0].group))


def build_plan(share: RankShare, keep_chunks: int, offload_activations: bool = False) -> list[Step]:
    """All steps of one rank: its sequence-parallel groups (in the share's order, which the other
    ranks of each group share), dependent groups (longest first), then standalone chunks."""
    if keep_chunks < 1:
        raise ValueError(f"keep_chunks must be >= 1, got {keep_chunks}")
    chunks = [c for g in rank_groups(share) for c in g] + list(share.standalone)
    return as_steps(rank_order(chunks, keep_chunks, offload_activations))


def join_backwards(plan: list[Step], keep_chunks: int) -> list[Step]:
    """Runs of standalone ``[F | B]`` steps become steps of up to ``keep_chunks`` forwards and one
    :class:`JointBackward`: one backward call, so one gradient reduction under ZeRO-2, per K chunks
    instead of per chunk. At most K chunks hold activations, as everywhere else in the plan::

        K = 3:   [F a | B a] [F b | B b] [F c | B c] [F d | B d]   ->   [F a F b F c | J(c b a)] [F d | B d]

    Dependent chunks keep their own backwards (they run in descending order, one call each, for the K/V
    gradient), and so does a pass left with one chunk.
    """
    out: list[Step] = []
    run: list[Step] = []

    def flush():
        if len(run) == 1:
            out.append(run[0])
        elif run:
            chunks = [s.fwd[0].chunk for s in run]
            out.append(Step(fwd=[s.fwd[0] for s in run], bwd=[JointBackward(tuple(reversed(chunks)))]))
        run.clear()

    for step in plan:
        standalone = (not step.pre and not step.post and len(step.fwd) == 1 and isinstance(step.fwd[0], Forward)
                      and not step.fwd[0].chunk.is_dependent and step.bwd == [Backward(step.fwd[0].chunk)])
        if not standalone:
            flush()
            out.append(step)
            continue
        run.append(step)
        if len(run) == keep_chunks:
            flush()
    flush()
    return out


def align(plans: list[list[Step]], lockstep: bool = True) -> list[list[Step]]:
    """Pads the ranks' plans so that they issue the same collectives.

    ``lockstep`` (every forward is collective: ZeRO-3 gathers parameters): step s gets the same
    (pre, fwd) counts on every rank. Otherwise (ZeRO-0/1/2, where a backward reduces gradients
    collectively, every parameter's whatever its chunk, and a sequence-parallel chunk's all-to-alls
    meet at the same instruction on the ranks of its block, whose plans begin alike: see
    :mod:`ds_chunkflow.runtime.batch_plan`) only the number of backwards must agree: each rank is
    topped up at the END with ``[PadForward | PadBackward]`` steps, so no rank waits inside the plan
    and the pads are the fewest possible (the per-step padding pads every step to the busiest rank's shape)::

        lockstep   rank 0  [F F | B B] [F | B]          rank 1  [F p | P B] [F | B]
        counts     rank 0  [F F | B B] [F | B]          rank 1  [F | B] [F | B]   (3 backwards each:
                                                                  rank 1 adds one [p | P] at the end)
    """
    if not lockstep:
        most = max((sum(len(step.bwd) for step in plan) for plan in plans), default=0)
        return [[Step(p.pre[:], p.fwd[:], p.bwd[:], p.post[:]) for p in plan]
                + [Step(fwd=[PadForward(keep=True)], bwd=[PadBackward()])
                   for _ in range(most - sum(len(step.bwd) for step in plan))] for plan in plans]
    num_steps = max((len(p) for p in plans), default=0)
    out = []
    for plan in plans:
        padded = [Step(p.pre[:], p.fwd[:], p.bwd[:], p.post[:]) for p in plan]
        padded += [Step() for _ in range(num_steps - len(plan))]
        out.append(padded)
    for s in range(num_steps):
        n_pre = max(len(p[s].pre) for p in out)
        n_fwd = max(len(p[s].fwd) for p in out)
        for p in out:
            step = p[s]
            step.pre += [PadForward(keep=False)] * (n_pre - len(step.pre))
            extra = n_fwd - len(step.fwd)
            step.fwd += [PadForward(keep=True)] * extra
            step.bwd = [PadBackward()] * extra + step.bwd
    return out


def build_eval_plan(share: RankShare) -> list[Step]:
    """One rank's evaluation: every chunk forwarded once, in order, with no graph; a dependent
    group's state is released after its last chunk. Sequence-parallel groups first (as in
    :func:`build_plan`), so the ranks of a block reach each shard at the same instruction::

        group g (3 chunks): [E g0] [E g1] [E g2 | release g]     standalone c: [E c]
    """
    steps: list[Step] = []
    for g in rank_groups(share):
        steps += [Step(fwd=[EvalForward(c)]) for c in g]
        steps[-1].post.append(ReleaseState(g[0].group))
    steps += [Step(fwd=[EvalForward(c)]) for c in share.standalone]
    return steps


def align_eval(plans: list[list[Step]]) -> list[list[Step]]:
    """Pads every rank's evaluation plan with :class:`PadEvalForward` steps to the same length."""
    num_steps = max((len(p) for p in plans), default=0)
    return [p + [Step(fwd=[PadEvalForward()]) for _ in range(num_steps - len(p))] for p in plans]


def flatten(plan: list[Step]) -> list[Instruction]:
    return [ins for step in plan for ins in step.instructions()]


@dataclass(frozen=True)
class PlanStats:
    forward_tokens: int
    recompute_tokens: int
    num_pad_calls: int

    @property
    def recompute_fraction(self) -> float:
        """Recomputed tokens / tokens forwarded with a graph or for state."""
        return self.recompute_tokens / max(1, self.forward_tokens)


def plan_stats(plan: list[Step]) -> PlanStats:
    fwd = rec = pads = 0
    for ins in flatten(plan):
        if isinstance(ins, (StateForward, Forward, EvalForward)):
            fwd += ins.chunk.num_tokens
        elif isinstance(ins, Recompute):
            fwd += ins.chunk.num_tokens
            rec += ins.chunk.num_tokens
        elif isinstance(ins, (PadForward, PadBackward, PadEvalForward)):
            pads += 1
    return PlanStats(fwd, rec, pads)
