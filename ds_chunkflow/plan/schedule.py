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

from ds_chunkflow.plan.chunking import Chunk, CostModel, RankShare
from ds_chunkflow.plan.instructions import (
    BACKWARDS,
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
           "barrier_makespan", "barrier_segments", "build_eval_plan", "build_plan", "flatten", "group_steps",
           "instruction_cost", "join_at_barriers", "join_backwards", "plan_stats", "rank_groups", "rank_order"]


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
        if run:
            out.append(_run_step([s.fwd[0] for s in run]))
        run.clear()

    for step in plan:
        if not _standalone_step(step):
            flush()
            out.append(step)
            continue
        run.append(step)
        if len(run) == keep_chunks:
            flush()
    flush()
    return out


def _standalone_step(step: Step) -> bool:
    """``[F c | B c]`` of one standalone chunk (what :func:`join_backwards` may join)."""
    return (not step.pre and not step.post and len(step.fwd) == 1 and isinstance(step.fwd[0], Forward)
            and not step.fwd[0].chunk.is_dependent and step.bwd == [Backward(step.fwd[0].chunk)])


def instruction_cost(ins: Instruction, cost: CostModel) -> float:
    """Modelled time of one instruction on its rank: a forward (first, state-only or recompute) is
    ``forward_share`` of its chunk's :meth:`~ds_chunkflow.plan.chunking.CostModel.run_cost`, a backward
    the rest; pads and releases cost nothing."""
    if isinstance(ins, (Forward, StateForward, Recompute, EvalForward)):
        return cost.forward_share * cost.run_cost(ins.chunk)
    chunks = (ins.chunk,) if isinstance(ins, Backward) else ins.chunks if isinstance(ins, JointBackward) else ()
    return (1 - cost.forward_share) * sum(cost.run_cost(c) for c in chunks)


def barrier_segments(plan: list[Step], cost: CostModel) -> list[float]:
    """A rank's modelled work up to and including each of its backward calls (what follows the last
    one is added to it)::

        [F a F b | J(b a)] [F c | B c]   ->   [cost(a) + cost(b), cost(c)]
    """
    segments, work = [], 0.0
    for ins in flatten(plan):
        work += instruction_cost(ins, cost)
        if isinstance(ins, BACKWARDS):
            segments.append(work)
            work = 0.0
    if segments:
        segments[-1] += work
    return segments


def barrier_makespan(plans: list[list[Step]], cost: CostModel) -> float:
    """Modelled time of the plans when the i-th backward of every rank meets the others' (ZeRO-2 reduces the
    gradients in every backward): the sum over i of the slowest rank's work since its previous backward."""
    segments = [barrier_segments(p, cost) for p in plans]
    return sum(max(s[i] if i < len(s) else 0.0 for s in segments) for i in range(max(map(len, segments), default=0)))


BARRIER_GAIN = 0.99
""":func:`join_at_barriers` fills the waits only where that models at least 1% faster than K per backward."""


def join_at_barriers(plans: list[list[Step]], keep_chunks: int, cost: CostModel) -> list[list[Step]]:
    """Joins the standalone chunks' backwards for ranks whose backwards meet (ZeRO-2 reduces in each).

    Where every backward is a meeting, what counts is the work between the i-th and the (i+1)-th
    backward of each rank: a rank with little to do waits for the busiest. A rank's standalone chunks
    come last in its plan and may share backward calls in any runs of up to K
    (:class:`JointBackward`), so they are cut to fill the others' segments: while some rank still runs
    its fixed part (sequence-parallel and dependent groups, one backward per chunk), a rank in its
    standalone part takes its next chunks toward the busiest fixed segment (a chunk while at least half
    of it fits; none: a pad meets the backward); after, each rank cuts what it has left into
    as many equal runs as the rank with the most needs. Kept only if :func:`barrier_makespan` is at
    least 1% lower (:data:`BARRIER_GAIN`) than :func:`join_backwards`' K per call with no more backward
    calls (each is a gradient reduction, which the model does not price: on a large model it may cost
    more than the wait it saves); ranks are aligned
    by count after (:func:`align`). Two ranks, K = 4, a chunk costing its tokens; rank 0 runs a sequence of
    three 8-token chunks (segments 13.3, 5.3, 5.3), rank 1 standalone chunks of 8, 3, 5 and 4 tokens::

        K per call   rank 1  [F F F F | J] [p | P] [p | P]      segments 20, 0, 0   20 + 5.3 + 5.3   = 30.7
        filled       rank 1  [F F | J] [F | B] [F | B]          11, 5, 4            13.3 + 5.3 + 5.3 = 24
    """
    joined = [join_backwards(p, keep_chunks) for p in plans]
    if keep_chunks < 2 or len(plans) < 2:
        return joined
    fixed, tails = [], []
    for plan in plans:
        cut = len(plan)
        while cut and _standalone_step(plan[cut - 1]):
            cut -= 1
        fixed.append(plan[:cut])
        tails.append([step.fwd[0] for step in plan[cut:]])  # their Forward instructions, as built
    fixed_segments = [barrier_segments(p, cost) for p in fixed]
    runs: list[list[list[Forward]]] = [[] for _ in plans]
    for k in range(max(map(len, fixed_segments))):
        target = max(s[k] for s in fixed_segments if k < len(s))
        for r, tail in enumerate(tails):
            if k >= len(fixed_segments[r]):
                taken = _take(tail, keep_chunks, target, cost)
                runs[r].append(taken)
                del tail[:len(taken)]
    slots = max(-(-len(t) // keep_chunks) for t in tails)
    for r, tail in enumerate(tails):
        runs[r] += _even_runs(tail, slots, keep_chunks, cost)
    filled = [plan + [_run_step(run) for run in rank_runs] for plan, rank_runs in zip(fixed, runs)]
    filled, aligned = align(filled, lockstep=False), align(joined, lockstep=False)
    calls = [sum(len(step.bwd) for step in candidate[0]) for candidate in (filled, aligned)]
    if calls[0] <= calls[1] and barrier_makespan(filled, cost) < BARRIER_GAIN * barrier_makespan(aligned, cost):
        return filled
    return joined


def _take(tail: list[Forward], keep_chunks: int, target: float, cost: CostModel) -> list[Forward]:
    """The next chunks of ``tail`` (at most K) that come nearest ``target``: a chunk is taken while at least
    half of it fits."""
    taken, load = [], 0.0
    for forward in tail[:keep_chunks]:
        c = cost.run_cost(forward.chunk)
        if load + c / 2 > target:
            break
        taken.append(forward)
        load += c
    return taken


def _even_runs(tail: list[Forward], slots: int, keep_chunks: int, cost: CostModel) -> list[list[Forward]]:
    """``tail`` cut, in order, into ``slots`` runs of at most K chunks, near-equal in cost (empty runs last)."""
    runs, i = [], 0
    left = sum(cost.run_cost(f.chunk) for f in tail)
    for s in range(slots):
        run, load, share = [], 0.0, left / (slots - s)
        must = len(tail) - i - keep_chunks * (slots - s - 1)  # so that the later runs can hold the rest
        while i < len(tail) and len(run) < keep_chunks:
            c = cost.run_cost(tail[i].chunk)
            if len(run) >= max(1, must) and load + c / 2 > share:
                break
            run.append(tail[i])
            load += c
            i += 1
        left -= load
        runs.append(run)
    return runs


def _run_step(run: list[Forward]) -> Step:
    """``[F c1 .. F ck | J(ck .. c1)]`` (one chunk: ``[F c | B c]``; none: a pad)."""
    if not run:
        return Step(fwd=[PadForward(keep=True)], bwd=[PadBackward()])
    if len(run) == 1:
        return Step(fwd=run[:], bwd=[Backward(run[0].chunk)])
    return Step(fwd=run[:], bwd=[JointBackward(tuple(f.chunk for f in reversed(run)))])


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
