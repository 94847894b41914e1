"""The one chunk planner: every stage's op order for ChunkFlow's state-aware 1F1B. Pure Python.

Data parallelism is its one-stage case: one stage with one chunk in flight is Algorithm 2
(:func:`ds_chunkflow.plan.schedule.build_plan` cuts that order into lock-step steps). The ops are the
instructions of :mod:`ds_chunkflow.plan.instructions`.

Every micro-batch is a chunk. On every stage a chunk runs these ops:

    F  forward that keeps its activations   (standalone chunks, the last K of a group)
    S  state-only forward: keeps the K/V state, drops activations   (the first N-K of a group)
    R  recompute forward of an S chunk, right before it is needed    (cost of one forward)
    B  backward (twice a forward)

The plan is one *forward sequence* shared by all stages (the order F/S/R ops enter stage 0)
and the *backward sequence* derived from it. Each stage interleaves the two with the 1F1B
rule: run a backward as soon as it is released locally and ``P - s`` activations are in flight
(or no forward is left), else the next forward. S ops hold nothing, so they never wait.
With one F per standalone micro-batch this is exactly DeepSpeed's ``TrainSchedule`` order.

Within a group (chunks c0..c3, K=1)::

    forward sequence   S0 S1 S2 F3 .. R2 .. R1 .. R0      (other chunks may sit in the gaps)
    backward sequence  B3 .. B2 .. B1 .. B0               (descending: K/V gradients flow back)

Deadlock freedom (derived): all stages share both sequences and the limit shrinks with the
stage index, so stage s+1 never runs more forwards before its j-th backward than stage s does:
whatever stage s+1 waits for before that backward, stage s has already produced. When a kept
group needs more than ``P - s`` chunks in flight, the stage forwards on (the backward it waits
for is not released yet), so a stage holds at most ``P - s + K - 1`` chunks' activations.

The forward sequence is chosen among a few candidates by simulated makespan, optionally
refined by a seeded local search (:func:`plan_stages`); :func:`replay` times any per-stage
order (event-driven: an op starts when its stage is free and its inputs exist). The DeepSpeed
schedule (``pipeline/schedule.py``) runs this plan; the simulator (``simulate.py``) times it.

Activation offload is a pass over the forward sequence (:func:`offload_pass`): a state-only forward
becomes a forward whose saved tensors go to the CPU, and its recompute goes away.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from ds_chunkflow.plan.chunking import Chunk
from ds_chunkflow.plan.instructions import Backward, Forward, Recompute, StateForward

Op = Forward | StateForward | Recompute | Backward
"""One compute op of one chunk on one stage."""

# the timeline's phases of a chunk on a stage: its first forward (F or S), its recompute, its backward
FORWARD, RECOMPUTE, BACKWARD = "forward", "recompute", "backward"


def phase(op: Op) -> str:
    if isinstance(op, (Forward, StateForward)):
        return FORWARD
    return RECOMPUTE if isinstance(op, Recompute) else BACKWARD


def keeps_activations(chunk: Chunk, keep_chunks: int) -> bool:
    """True for standalone chunks and the last ``keep_chunks`` chunks of a group."""
    return chunk.group is None or chunk.index >= chunk.count - keep_chunks


def micro_batches(chunks: Sequence[Chunk]) -> dict[Chunk, int]:
    """Chunk -> its micro-batch id (position in ``chunks``); the chunks must be distinct."""
    index = {c: i for i, c in enumerate(chunks)}
    if len(index) != len(chunks):
        raise ValueError("a plan's chunks must be distinct (the same chunk twice in one batch)")
    return index


# --------------------------------------------------------------------------- sequences


def _group_ops(group: Sequence[tuple[int, Chunk]], keep_chunks: int) -> tuple[list[Op], list[Op]]:
    """(forward ops in ascending order, recompute ops in descending order) of one group."""
    fwd = [Forward(c) if keeps_activations(c, keep_chunks) else StateForward(c) for _, c in group]
    rec = [Recompute(c) for _, c in reversed(group) if not keeps_activations(c, keep_chunks)]
    return fwd, rec


def _groups(chunks: Sequence[Chunk]) -> dict[int, list[tuple[int, Chunk]]]:
    out: dict[int, list[tuple[int, Chunk]]] = {}
    for mb, c in enumerate(chunks):
        if c.group is not None:
            out.setdefault(c.group, []).append((mb, c))
    for g in out.values():
        g.sort(key=lambda it: it[1].index)
    return out


def given_sequence(chunks: Sequence[Chunk], keep_chunks: int) -> list[Op]:
    """Chunks in the given order; a group's recomputes right after its last forward (Algorithm 2's order)."""
    groups = _groups(chunks)
    seen: set[int] = set()
    out: list[Op] = []
    for c in chunks:
        if c.group is None:
            out.append(Forward(c))
        elif c.group not in seen:
            seen.add(c.group)
            fwd, rec = _group_ops(groups[c.group], keep_chunks)
            out += fwd + rec
    return out


def candidate_sequences(chunks: Sequence[Chunk], keep_chunks: int, costs: Sequence[float]) -> dict[str, list[Op]]:
    """A few forward sequences; :func:`plan_stages` keeps the one with the shortest makespan.

    given       chunks in the given order; a group's recomputes right after its last forward
                (the plain reading of the paper; plain 1F1B when nothing is dependent)
    fill        groups first (largest first), then standalone chunks, cheapest last;
                recompute ops spread evenly among the standalone chunks so that their
                forwards fill the gaps the recompute traversal leaves
    fill_small  like ``fill`` but opens with the cheapest standalone chunk (a short pipeline fill)
    blocks      groups first (largest first), each with its recomputes right after its forwards,
                then standalone chunks, cheapest last (smooth costs suit 1F1B when attention
                makes late chunks of a group expensive)
    blocks_small  like ``blocks`` but opens with the cheapest standalone chunk
    """
    groups = _groups(chunks)
    standalone = sorted((mb for mb, c in enumerate(chunks) if c.group is None), key=lambda mb: (-costs[mb], mb))
    ordered = sorted(groups.values(), key=lambda g: (-sum(costs[mb] for mb, _ in g), g[0][0]))
    head: list[Op] = []
    recs: list[Op] = []
    for g in ordered:
        fwd, rec = _group_ops(g, keep_chunks)
        head += fwd
        recs += rec
    alone: list[Op] = [Forward(chunks[mb]) for mb in standalone]
    blocks = [op for g in ordered for part in _group_ops(g, keep_chunks) for op in part]
    out = {"given": given_sequence(chunks, keep_chunks), "fill": head + _spread(recs, alone), "blocks": blocks + alone}
    if standalone:
        out["fill_small"] = alone[-1:] + head + _spread(recs, alone[:-1])
        out["blocks_small"] = alone[-1:] + blocks + alone[:-1]
    return out


def offload_pass(fwd: Sequence[Op]) -> list[Op]:
    """Activation offload: a state-only forward keeps its graph with the saved tensors on the CPU
    (``Forward(offload=True)``) and needs no recompute::

        S0 S1 F2 R1 R0   ->   F0* F1* F2        (* offload=True; backwards B2 B1 B0 after F2)
    """
    return [Forward(op.chunk, offload=True) if isinstance(op, StateForward) else op
            for op in fwd if not isinstance(op, Recompute)]


def _spread(first: list[Op], second: list[Op]) -> list[Op]:
    """Merge two lists keeping each one's order, ``first`` spread evenly over ``second``."""
    out: list[Op] = []
    n, m = len(first), len(second)
    j = 0
    for i, op in enumerate(first):
        # first[i] goes before second[ceil(i * m / n)]: even spacing, starting with first[0]
        upto = -(-i * m // n) if n else 0
        out += second[j:upto]
        j = max(j, upto)
        out.append(op)
    return out + second[j:]


def backward_sequence(fwd: Sequence[Op], chunks: Sequence[Chunk]) -> list[Op]:
    """Backward order implied by a forward sequence.

    A standalone chunk and a recomputed chunk are released by their own F / R; the kept chunks
    of a group (offloaded ones included) all wait for the group's last forward and then go in
    descending order.
    """
    out: list[Op] = []
    groups = _groups(chunks)
    kept = {op.chunk for op in fwd if isinstance(op, Forward)}
    for op in fwd:
        c = op.chunk
        if isinstance(op, Recompute) or (isinstance(op, Forward) and c.group is None):
            out.append(Backward(c))
        elif isinstance(op, Forward) and c.index == c.count - 1:
            out += [Backward(d) for _, d in reversed(groups[c.group]) if d in kept]
    return out


def stage_order(fwd: Sequence[Op], bwd: Sequence[Op], limit: int) -> list[Op]:
    """The 1F1B rule on one stage: a released backward once ``limit`` activations are in flight."""
    hold_pos = {op.chunk: i for i, op in enumerate(fwd) if not isinstance(op, StateForward)}
    out: list[Op] = []
    i = j = in_flight = 0
    while i < len(fwd) or j < len(bwd):
        released = j < len(bwd) and hold_pos[bwd[j].chunk] < i
        if released and (in_flight >= limit or i == len(fwd)):
            out.append(bwd[j])
            j += 1
            in_flight -= 1
        else:
            assert i < len(fwd), "backward sequence releases a chunk that is never forwarded"
            out.append(fwd[i])
            in_flight += not isinstance(fwd[i], StateForward)
            i += 1
    return out


def stage_orders(fwd: Sequence[Op], chunks: Sequence[Chunk], num_stages: int) -> list[list[Op]]:
    """Per-stage op orders of one forward sequence (stage ``s`` keeps ``P - s`` in flight)."""
    bwd = backward_sequence(fwd, chunks)
    return [stage_order(fwd, bwd, num_stages - s) for s in range(num_stages)]


# --------------------------------------------------------------------------- timing


def _links(chunks: Sequence[Chunk]) -> tuple[dict[int, int], dict[int, int]]:
    """Previous and next chunk (micro-batch ids) of every dependent chunk."""
    prev: dict[int, int] = {}
    nxt: dict[int, int] = {}
    for g in _groups(chunks).values():
        for (a, _), (b, _) in itertools.pairwise(g):
            prev[b], nxt[a] = a, b
    return prev, nxt


def replay(orders: Sequence[Sequence[Op]], chunks: Sequence[Chunk], costs: Sequence[float],
           backward_factor: float = 2.0) -> list[list[tuple[float, float, Op]]]:
    """Time per-stage op orders: ``timeline[s] = [(start, end, op), ...]``.

    An op starts when its stage is free and its inputs have arrived:

    * F/S on stage s: F/S of the same chunk on stage s-1, and (K/V state) F/S of the group's
      previous chunk on stage s;
    * R on stage s: R of the same chunk on stage s-1 (the recompute traverses the pipeline);
    * B on stage s: B of the same chunk on stage s+1, or on the last stage its own F / R;
      also B of the group's next chunk on stage s (K/V gradients) and its own R.

    Raises ``RuntimeError`` if the orders deadlock (an op waits on one that never runs first).
    """
    num_stages = len(orders)
    mb_of = micro_batches(chunks)
    prev, nxt = _links(chunks)
    recomputed = {mb_of[op.chunk] for op in orders[0] if isinstance(op, Recompute)}
    end: dict[tuple[int, str, int], float] = {}
    timeline: list[list[tuple[float, float, Op]]] = [[] for _ in orders]
    pos = [0] * num_stages
    free = [0.0] * num_stages

    def deps(op: Op, mb: int, s: int) -> list[tuple[int, str, int]]:
        if isinstance(op, (Forward, StateForward)):
            return ([(s - 1, FORWARD, mb)] if s > 0 else []) + ([(s, FORWARD, prev[mb])] if mb in prev else [])
        if isinstance(op, Recompute):
            return [(s - 1, RECOMPUTE, mb)] if s > 0 else [(s, FORWARD, mb)]
        own = RECOMPUTE if mb in recomputed else FORWARD
        out = [(s + 1, BACKWARD, mb)] if s < num_stages - 1 else [(s, own, mb)]
        return out + [(s, own, mb)] + ([(s, BACKWARD, nxt[mb])] if mb in nxt else [])

    progress = True
    while progress:
        progress = False
        for s in range(num_stages):
            while pos[s] < len(orders[s]):
                op = orders[s][pos[s]]
                mb = mb_of[op.chunk]
                waits = deps(op, mb, s)
                if any(k not in end for k in waits):
                    break
                start = max([free[s]] + [end[k] for k in waits])
                dur = costs[mb] * (backward_factor if isinstance(op, Backward) else 1.0)
                free[s] = start + dur
                end[(s, phase(op), mb)] = free[s]
                timeline[s].append((start, free[s], op))
                pos[s] += 1
                progress = True
    stuck = [(s, orders[s][pos[s]]) for s in range(num_stages) if pos[s] < len(orders[s])]
    if stuck:
        raise RuntimeError(f"pipeline deadlock: (stage, next op) {stuck}")
    return timeline


def makespan(timeline: Sequence[Sequence[tuple[float, float, Op]]]) -> float:
    return max((row[-1][1] for row in timeline if row), default=0.0)


# --------------------------------------------------------------------------- plan


@dataclass
class StagePlan:
    """The chosen forward sequence, every stage's op order and its simulated timeline."""

    strategy: str
    forward: list[Op]
    orders: list[list[Op]]
    timeline: list[list[tuple[float, float, Op]]]
    chunks: list[Chunk] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.micro_batch = micro_batches(self.chunks)
        """Chunk -> micro-batch id (its position in :attr:`chunks`)."""

    @property
    def makespan(self) -> float:
        return makespan(self.timeline)


def plan_stages(chunks: Sequence[Chunk], num_stages: int, keep_chunks: int = 1, costs: Sequence[float] | None = None,
                strategy: str = "auto", backward_factor: float = 2.0, search_iters: int = 0,
                offload: bool = False) -> StagePlan:
    """Choose a forward sequence (``strategy``: a name from :func:`candidate_sequences` or
    "auto" for the shortest simulated makespan, ties to the earlier candidate), then improve it
    with ``search_iters`` steps of :func:`_local_search`; ``offload``: :func:`offload_pass` on every
    candidate. Deterministic: every rank gets the same plan."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if keep_chunks < 1:
        raise ValueError(f"keep_chunks must be >= 1, got {keep_chunks}")
    chunks = list(chunks)
    micro_batches(chunks)
    costs = list(costs) if costs is not None else [float(c.num_tokens) for c in chunks]
    if any(c <= 0 for c in costs):
        raise ValueError("costs must be > 0 (a zero-time op has no place on the timeline)")
    cands = candidate_sequences(chunks, keep_chunks, costs)
    if strategy != "auto":
        if strategy not in cands:
            raise ValueError(f"strategy must be 'auto' or one of {sorted(cands)}, got {strategy!r}")
        cands = {strategy: cands[strategy]}
    if offload:
        cands = {name: offload_pass(fwd) for name, fwd in cands.items()}

    def make(name: str, fwd: list[Op]) -> StagePlan:
        orders = stage_orders(fwd, chunks, num_stages)
        return StagePlan(name, fwd, orders, replay(orders, chunks, costs, backward_factor), chunks)

    best = min((make(name, fwd) for name, fwd in cands.items()), key=lambda p: p.makespan)
    return _local_search(best, chunks, make, search_iters) if search_iters > 0 else best


def _local_search(best: StagePlan, chunks: Sequence[Chunk], make, iters: int) -> StagePlan:
    """Move one op to a random place, keep the move unless the makespan grows (seeded).

    A group's ops keep their relative order (forwards ascending, then recomputes descending),
    so an op of a group only moves between its neighbours in that order.
    """
    rng = random.Random(0)
    fwd = list(best.forward)
    group_ops: dict[int, list[Op]] = {}
    for op in fwd:
        if op.chunk.group is not None:
            group_ops.setdefault(op.chunk.group, []).append(op)
    for _ in range(iters):
        i = rng.randrange(len(fwd))
        op = fwd[i]
        cand = fwd[:i] + fwd[i + 1:]
        lo, hi = 0, len(cand)
        mates = group_ops.get(op.chunk.group) if op.chunk.group is not None else None
        if mates:
            k = mates.index(op)
            lo = cand.index(mates[k - 1]) + 1 if k > 0 else 0
            hi = cand.index(mates[k + 1]) if k + 1 < len(mates) else len(cand)
        j = rng.randint(lo, hi)
        if j == i:
            continue
        cand.insert(j, op)
        p = make(best.strategy.split("+")[0] + "+search", cand)
        if p.makespan <= best.makespan + 1e-9:
            best, fwd = p, cand
    return best
