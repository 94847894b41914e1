"""The pipeline simulator: times the runtime plan (:mod:`ds_chunkflow.plan.planner`) on a
simulated pipeline, for benchmarks and for choosing settings. Pure Python: no DeepSpeed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ds_chunkflow.plan.chunking import Chunk, CostModel, Segment, build_chunks
from ds_chunkflow.plan.instructions import Backward, Recompute, StateForward, letter
from ds_chunkflow.plan.planner import Op, StagePlan, plan_stages

# --------------------------------------------------------------------------- simulate


@dataclass
class SimResult:
    """A simulated pipeline timeline. ``timeline[s] = [(start, end, letter, micro_batch), ...]``."""

    num_stages: int
    chunks: list[Chunk]
    plan: StagePlan
    keep_chunks: int | None

    @property
    def timeline(self) -> list[list[tuple[float, float, str, int]]]:
        mb = self.plan.micro_batch
        return [[(a, b, letter(op), mb[op.chunk]) for a, b, op in row] for row in self.plan.timeline]

    @property
    def makespan(self) -> float:
        return self.plan.makespan

    @property
    def busy_time(self) -> float:
        """Compute time summed over stages (recomputes included)."""
        return sum(b - a for row in self.plan.timeline for a, b, _ in row)

    @property
    def recompute_time(self) -> float:
        return sum(b - a for row in self.plan.timeline for a, b, op in row if isinstance(op, Recompute))

    @property
    def bubble_ratio(self) -> float:
        """Idle stage-time / (num_stages x makespan)."""
        total = self.num_stages * self.makespan
        return 1.0 - self.busy_time / total if total > 0 else 0.0

    @property
    def peak_in_flight(self) -> list[int]:
        """Per stage, the most chunks holding activations at once (F/R run, B not yet)."""
        return [_peak(row, lambda c: 1) for row in self.plan.orders]

    @property
    def peak_in_flight_tokens(self) -> list[int]:
        """Per stage, the most tokens whose activations are held at once."""
        return [_peak(row, lambda c: c.num_tokens) for row in self.plan.orders]


def _peak(order: Sequence[Op], weight) -> int:
    held = peak = 0
    for op in order:
        step = -1 if isinstance(op, Backward) else 0 if isinstance(op, StateForward) else 1
        held += step * weight(op.chunk)
        peak = max(peak, held)
    return peak


def simulate(lengths: Sequence[int], num_stages: int, chunk_size: int | None = None, keep_chunks: int = 1, *,
             attention_cost: float = 0.0, backward_factor: float = 2.0, strategy: str = "auto",
             search_iters: int = 0) -> SimResult:
    """Simulate one global batch through ``num_stages`` pipeline stages.

    ``chunk_size=None``: plain 1F1B, one micro-batch per sequence in the given order.
    Otherwise ChunkFlow: :func:`~ds_chunkflow.plan.chunking.build_chunks`, state-aware 1F1B with
    ``keep_chunks`` (K). A forward on one stage costs ``tokens + attention_cost x pairs``
    (query-key pairs, the dependent prefix included), a backward ``backward_factor`` times that,
    a recompute one forward. ``strategy`` and ``search_iters``: see :func:`plan`.
    """
    if chunk_size is None:
        chunks = [Chunk((Segment(i, 0, int(n)),)) for i, n in enumerate(lengths)]
        strategy, keep, search_iters = "given", None, 0
    else:
        layout = build_chunks(lengths, chunk_size)
        chunks = [c for g in layout.groups for c in g] + layout.standalone
        keep = keep_chunks
    cost = CostModel(linear=1.0, attention=attention_cost)
    costs = [cost.chunk_cost(c) for c in chunks]
    p = plan_stages(chunks, num_stages, keep or 1, costs, strategy, backward_factor, search_iters)
    return SimResult(num_stages, chunks, p, keep)
