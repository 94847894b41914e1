"""State-aware chunk scheduling (ChunkFlow Algorithm 2) as data.

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
every data-parallel rank must issue the same sequence of forwards and backwards.
:func:`align` pads the plans step by step with one-token ``PadForward``/``PadBackward``
calls until every rank has the same shape; only then is the last backward of the
step the same call on every rank (the gradient-accumulation boundary).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ds_chunkflow.plan.chunking import Chunk, RankShare


class Instruction:
    """Base class; executors map each subclass to one method and refuse unknown ones."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(vars(self).values())))


class StateForward(Instruction):
    """Forward a dependent chunk with no graph, writing its K/V into the group state.

    Roughly: ``with no_grad(): model(chunk)``; keep only the state.
    """

    def __init__(self, chunk: Chunk):
        self.chunk = chunk


class Forward(Instruction):
    """Forward a chunk keeping its activations (optionally offloaded to the CPU).

    Roughly: ``loss[chunk] = CE(model(chunk)) / num_loss_tokens``.
    """

    def __init__(self, chunk: Chunk, offload: bool = False):
        self.chunk = chunk
        self.offload = offload


class Recompute(Instruction):
    """Forward a dependent chunk again, from the RNG state of its first forward.

    Roughly: ``set_rng(saved[chunk]); loss[chunk] = CE(model(chunk)) / n``.
    """

    def __init__(self, chunk: Chunk):
        self.chunk = chunk


class Backward(Instruction):
    """Backward of a chunk's loss; the K/V gradients flow through the group state.

    Roughly: ``backward(loss.pop(chunk))``.
    """

    def __init__(self, chunk: Chunk):
        self.chunk = chunk


class PadForward(Instruction):
    """A one-token forward that contributes nothing, so ranks issue equal collectives.

    Roughly: ``pad_loss = 0 * model([token 0]).sum()`` (kept only if ``keep``).
    """

    def __init__(self, keep: bool):
        self.keep = keep


class PadBackward(Instruction):
    """Backward of the oldest pending pad loss (a zero gradient)."""


class EvalForward(Instruction):
    """Forward a chunk with no graph and add its summed loss (evaluation: no backward follows).

    Roughly: ``with no_grad(): loss_sum += CE(model(chunk))``; a dependent chunk also fills the
    K/V state for the next one, as a :class:`StateForward` does.
    """

    def __init__(self, chunk: Chunk):
        self.chunk = chunk


class PadEvalForward(Instruction):
    """A one-token evaluation forward with the loss head's calls and no loss, so ranks issue
    equal collectives (ZeRO-3 gathers per module call).

    Roughly: ``with no_grad(): 0 * CE(model([token 0]))``.
    """


class ReleaseState(Instruction):
    """Free a dependent group's K/V state after its last backward (local: no model call)."""

    def __init__(self, group: int):
        self.group = group


@dataclass
class Step:
    pre: list[Instruction] = field(default_factory=list)
    fwd: list[Instruction] = field(default_factory=list)
    bwd: list[Instruction] = field(default_factory=list)
    post: list[Instruction] = field(default_factory=list)

    def instructions(self) -> list[Instruction]:
        return self.pre + self.fwd + self.bwd + self.post


def group_steps(chunks: list[Chunk], keep_chunks: int, offload: bool = False) -> list[Step]:
    """Algorithm 2 for one dependent group (chunks in ascending index order)."""
    n, k = len(chunks), min(keep_chunks, len(chunks))
    if offload:
        first = Step(fwd=[Forward(c, offload=i < n - k) for i, c in enumerate(chunks)])
        first.bwd = [Backward(c) for c in reversed(chunks)]
        steps = [first]
    else:
        first = Step(pre=[StateForward(c) for c in chunks[: n - k]], fwd=[Forward(c) for c in chunks[n - k:]])
        first.bwd = [Backward(c) for c in reversed(chunks[n - k:])]
        steps = [first] + [Step(fwd=[Recompute(c)], bwd=[Backward(c)]) for c in reversed(chunks[: n - k])]
    steps[-1].post.append(ReleaseState(chunks[0].group))
    return steps


def build_plan(share: RankShare, keep_chunks: int, offload_activations: bool = False) -> list[Step]:
    """All steps of one rank: its sequence-parallel groups (in the share's order, which the other
    ranks of each group share), dependent groups (longest first), then standalone chunks."""
    if keep_chunks < 1:
        raise ValueError(f"keep_chunks must be >= 1, got {keep_chunks}")
    steps: list[Step] = []
    for g in share.sp_groups + sorted(share.groups, key=lambda g: (-len(g), g[0].group)):
        steps += group_steps(g, keep_chunks, offload_activations)
    steps += [Step(fwd=[Forward(c)], bwd=[Backward(c)]) for c in share.standalone]
    return steps


def align(plans: list[list[Step]]) -> list[list[Step]]:
    """Pads every rank's plan so step s has the same (pre, fwd) counts on all ranks."""
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
    for g in share.sp_groups + sorted(share.groups, key=lambda g: (-len(g), g[0].group)):
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
