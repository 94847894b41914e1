"""Chunk construction (ChunkFlow Algorithm 1) and data-parallel assignment.

Pure logic: lengths in, chunk descriptions out. No torch.distributed, no deepspeed.

Given the sequences of one global batch and ``chunk_size``:

* a sequence longer than ``chunk_size`` is cut every ``chunk_size`` tokens into a
  *dependent group* of ``N = ceil(len / chunk_size)`` chunks (the last may be shorter);
  the group's chunks hold only that sequence, so chunk ``i`` starts at token
  ``i * chunk_size`` and attends to the keys/values of chunks ``0..i-1``;
* the other sequences are bin-packed into *standalone* chunks of capacity
  ``chunk_size`` with Best-Fit-Decreasing (sort by length, put each sequence into
  the fullest chunk it still fits in). BFD uses at most ``11/9 OPT + 6/9`` bins; on
  SFT-like length distributions it sits within a fraction of a percent of the lower
  bound ``ceil(total / chunk_size)`` (see ``benchmarks/bench_chunking.py``).

Materialising a chunk (:func:`materialize`) gives the tensors of one model call.
Labels are shifted per *sequence* before cutting, so a target never crosses a packed
boundary and a cut never loses a target::

    two packed sequences a (3 tokens) and b (2 tokens), chunk_size 8
    tokens    [a0 a1 a2 | b0 b1]
    positions [ 0  1  2 |  0  1]
    targets   [a1 a2 -- | b1 --]          (-- = -100, no loss)

    one sequence c of 5 tokens, chunk_size 2 -> 3 dependent chunks
    tokens    [c0 c1] [c2 c3] [c4]
    positions [ 0  1] [ 2  3] [ 4]
    targets   [c1 c2] [c3 c4] [--]        (chunk 0's last target is chunk 1's first token)

Data parallelism (:func:`assign_to_ranks`): every rank plans the whole global batch the same way
(no communication). Dependent groups (whole, or spread over a sequence-parallel block of ranks) and
the short sequences are dealt to ranks longest-processing-time first by :class:`CostModel` cost;
each rank packs its own short sequences with BFD. Dealing sequences rather than the batch's packed
chunks keeps small global batches balanced, where a rank's share is about one chunk. With sequence
parallelism, :func:`plan_layout` may also cut a short sequence heavier than a rank's share into a
dependent group, so that it can be spread (kept only where the busiest rank gets lighter).
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, field, replace
from typing import Sequence


@dataclass(frozen=True)
class Segment:
    """A contiguous piece ``[start, start + length)`` of sequence ``seq_index``."""

    seq_index: int
    start: int
    length: int


@dataclass(frozen=True)
class Shard:
    """One rank's share of a sequence-parallel chunk: rows part ``index`` of ``len(ranks)``.

    The chunk's T rows are cut into ``len(ranks)`` contiguous parts of ``ceil(T / P)`` rows (the
    last parts may be short or empty: the executor pads them, see :mod:`ds_chunkflow.ops.sequence_parallel`)::

        T = 10, ranks (2, 3, 4): rows [0, 4) on rank 2, [4, 8) on rank 3, [8, 10) + 2 pad rows on rank 4
    """

    ranks: tuple[int, ...]
    index: int

    @property
    def size(self) -> int:
        return len(self.ranks)

    def rows_per_rank(self, num_tokens: int) -> int:
        return -(-num_tokens // self.size)

    def rows(self, num_tokens: int) -> tuple[int, int]:
        """``[lo, hi)``: the chunk rows this rank holds."""
        per = self.rows_per_rank(num_tokens)
        lo = min(self.index * per, num_tokens)
        return lo, min(lo + per, num_tokens)


@dataclass(frozen=True)
class Chunk:
    """One model call's worth of tokens.

    A standalone chunk packs whole sequences (``group is None``). A dependent chunk is
    piece ``index`` of ``count`` of sequence ``group`` and starts at token ``offset``.
    A chunk with a ``shard`` is run by a sequence-parallel group of ranks, this rank holding
    the rows ``shard.rows(num_tokens)``.
    """

    segments: tuple[Segment, ...]
    group: int | None = None
    index: int = 0
    count: int = 1
    shard: Shard | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens of the whole chunk (over all ranks of a sequence-parallel group)."""
        return sum(s.length for s in self.segments)

    @property
    def local_tokens(self) -> int:
        """Tokens this rank holds (a shard's rows; the whole chunk otherwise)."""
        if self.shard is None:
            return self.num_tokens
        lo, hi = self.shard.rows(self.num_tokens)
        return hi - lo

    @property
    def is_dependent(self) -> bool:
        return self.group is not None

    @property
    def offset(self) -> int:
        """Tokens of the same sequence before this chunk (the K/V prefix it attends to)."""
        return self.segments[0].start if self.is_dependent else 0

    def __repr__(self) -> str:
        if self.shard is not None:
            return (f"Chunk(seq={self.group}, {self.index}/{self.count}, tokens={self.num_tokens}, "
                    f"shard {self.shard.index}/{self.shard.size} of ranks {self.shard.ranks})")
        if self.is_dependent:
            return f"Chunk(seq={self.group}, {self.index}/{self.count}, tokens={self.num_tokens})"
        return f"Chunk(packed={[s.seq_index for s in self.segments]}, tokens={self.num_tokens})"


@dataclass
class ChunkLayout:
    """All chunks of one global batch: standalone chunks and dependent groups."""

    chunk_size: int
    standalone: list[Chunk]
    groups: list[list[Chunk]]
    num_real_tokens: int

    @property
    def num_chunks(self) -> int:
        return len(self.standalone) + sum(len(g) for g in self.groups)

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / (chunks x chunk_size): the share of computed slots that hold data."""
        return self.num_real_tokens / max(1, self.num_chunks * self.chunk_size)

    def lower_bound_chunks(self) -> int:
        return math.ceil(self.num_real_tokens / self.chunk_size)


def best_fit_decreasing(items: list[tuple[int, int]], capacity: int) -> list[list[int]]:
    """Pack ``(length, seq_index)`` items into bins; returns bins as lists of seq indices.

    Bins are kept in buckets keyed by remaining capacity; ``caps`` is the sorted list of
    capacities that have at least one open bin, so best fit is one bisect.
    """
    items = sorted(items, key=lambda it: (-it[0], it[1]))
    bins: list[list[int]] = []
    by_cap: dict[int, list[int]] = {}
    caps: list[int] = []
    for length, seq in items:
        pos = bisect.bisect_left(caps, length)
        if pos == len(caps):
            bin_id = len(bins)
            bins.append([])
            remaining = capacity
        else:
            remaining = caps[pos]
            bucket = by_cap[remaining]
            bin_id = bucket.pop()
            if not bucket:
                del by_cap[remaining]
                caps.pop(pos)
        bins[bin_id].append(seq)
        remaining -= length
        if remaining > 0:
            if remaining not in by_cap:
                by_cap[remaining] = []
                bisect.insort(caps, remaining)
            by_cap[remaining].append(bin_id)
    return bins


def build_chunks(lengths: Sequence[int], chunk_size: int, split_above: int | None = None) -> ChunkLayout:
    """Algorithm 1: split sequences longer than ``chunk_size``, pack the rest.

    ``split_above`` (``<= chunk_size``; used by :func:`plan_layout` with sequence parallelism): a
    sequence of ``split_above < n <= chunk_size`` tokens becomes a dependent group too, cut every
    ``split_above`` tokens (a group may be spread over ranks, a packed sequence may not). Longer
    sequences are cut every ``chunk_size`` tokens either way.

    Deterministic: the result depends only on ``lengths``, ``chunk_size`` and ``split_above``.
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be an int > 0, got {chunk_size!r}")
    split = chunk_size if split_above is None else split_above
    if not isinstance(split, int) or not 0 < split <= chunk_size:
        raise ValueError(f"split_above must be an int in [1, chunk_size={chunk_size}], got {split_above!r}")
    short: list[tuple[int, int]] = []
    groups: list[list[Chunk]] = []
    for i, n in enumerate(lengths):
        if not isinstance(n, int) or n <= 0:
            raise ValueError(f"sequence {i} has length {n!r}; every sequence needs a whole number >= 1 of tokens")
        if n <= split:
            short.append((n, i))
            continue
        size = chunk_size if n > chunk_size else split
        count = math.ceil(n / size)
        groups.append([
            Chunk((Segment(i, j * size, min(size, n - j * size)),), group=i, index=j, count=count)
            for j in range(count)
        ])
    return ChunkLayout(chunk_size, pack(short, chunk_size), groups, int(sum(lengths)))


def pack(short: list[tuple[int, int]], capacity: int) -> list[Chunk]:
    """Standalone chunks of whole sequences, ``(length, seq_index)`` each, by :func:`best_fit_decreasing`."""
    lens = dict((seq, n) for n, seq in short)
    return [Chunk(tuple(Segment(seq, 0, lens[seq]) for seq in sorted(b))) for b in best_fit_decreasing(short, capacity)]


# --------------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class CostModel:
    """Cost of a chunk = tokens x ``linear`` + attended (query, key) pairs x ``attention``.

    Per layer a token costs ~24 h^2 FLOPs in the dense parts and a (query, key) pair ~4 h
    in attention, so ``attention / linear`` ~ 1 / (6 h). The default is h = 4096.
    ``all_to_all``: the cost of sending one token's attention inputs and output to another rank
    (sequence parallelism), relative to computing it (``linear``).

    ``keep_chunks``: the plan's K, so a dependent group's recompute is counted: with N > K chunks its
    first N - K are forwarded twice (once for the state, once for the graph), each extra forward
    costing ``forward_share`` of the chunk (forward + backward: about 1/3). None: not counted (the
    recompute is offloaded away, or the caller plans without K)::

        5 chunks, K = 2, each costing c:   5 c + (5 - 2) x c / 3
    """

    linear: float = 1.0
    attention: float = 1.0 / (6 * 4096)
    all_to_all: float = 0.1
    keep_chunks: int | None = None
    forward_share: float = 1.0 / 3

    def chunk_cost(self, chunk: Chunk) -> float:
        pairs = 0.0
        for s in chunk.segments:
            # causal within the piece, plus the whole prefix of a dependent chunk
            pairs += s.length * (s.length + 1) / 2 + s.length * (s.start if chunk.is_dependent else 0)
        return chunk.num_tokens * self.linear + pairs * self.attention

    def group_cost(self, chunks: Sequence[Chunk], sp_size: int = 1) -> float:
        """Per-rank cost of a dependent group run by ``sp_size`` ranks: its compute / P plus the
        all-to-all traffic each rank sends, ``(tokens / P) x (P - 1) / P``."""
        compute = sum(self.chunk_cost(c) for c in chunks) + self.recompute_cost(chunks)
        tokens = sum(c.num_tokens for c in chunks)
        p = sp_size
        return compute / p + self.all_to_all * (tokens / p) * (p - 1) / p

    def run_cost(self, chunk: Chunk) -> float:
        """Cost of one chunk's forward and backward on the rank that runs it: a sequence-parallel shard's
        share of the chunk plus the all-to-all traffic it sends (as :meth:`group_cost`)."""
        if chunk.shard is None:
            return self.chunk_cost(chunk)
        p = chunk.shard.size
        return self.chunk_cost(chunk) / p + self.all_to_all * (chunk.num_tokens / p) * (p - 1) / p

    def recompute_cost(self, chunks: Sequence[Chunk]) -> float:
        """The extra forwards of a dependent group's chunks that run twice (see ``keep_chunks``)."""
        if self.keep_chunks is None:
            return 0.0
        return self.forward_share * sum(self.chunk_cost(c) for c in chunks[:max(0, len(chunks) - self.keep_chunks)])

    def layout_cost(self, layout: "ChunkLayout") -> float:
        """Compute cost of a whole batch (no all-to-all): every group and standalone chunk."""
        return sum(self.group_cost(g) for g in layout.groups) + sum(self.chunk_cost(c) for c in layout.standalone)


@dataclass
class RankShare:
    """What one data-parallel rank runs: whole dependent groups, its shards of sequence-parallel
    groups (run first, in the same order on every rank of their group) and standalone chunks."""

    rank: int
    groups: list[list[Chunk]] = field(default_factory=list)
    standalone: list[Chunk] = field(default_factory=list)
    cost: float = 0.0
    sp_groups: list[list[Chunk]] = field(default_factory=list)

    def all_chunks(self) -> list[Chunk]:
        return [c for g in self.sp_groups + self.groups for c in g] + self.standalone

    @property
    def num_chunks(self) -> int:
        return len(self.all_chunks())

    @property
    def num_tokens(self) -> int:
        """Tokens this rank computes (a shard counts its own rows)."""
        return sum(c.local_tokens for c in self.all_chunks())


def sp_sizes(num_ranks: int, max_size: int) -> list[int]:
    """Sequence-parallel sizes a group may get: powers of two up to ``max_size`` dividing ``num_ranks``."""
    sizes, p = [], 2
    while p <= min(max_size, num_ranks):
        if num_ranks % p == 0:
            sizes.append(p)
        p *= 2
    return sizes


SP_THRESHOLDS = (1.0, 0.75, 0.5, 0.35, 0.25)
"""Candidate per-rank cost caps (fractions of the mean load) above which a group is spread."""


def choose_sp_sizes(layout: ChunkLayout, num_ranks: int, cost: CostModel, max_size: int,
                    cap_fraction: float) -> dict[int, int]:
    """Group index -> sequence-parallel size, for the groups whose cost exceeds ``cap_fraction`` of the
    mean per-rank load: the smallest size that brings the group's per-rank cost (all-to-all included)
    under the cap, or the size with the lowest per-rank cost if none does."""
    sizes = sp_sizes(num_ranks, max_size)
    if not sizes:
        return {}
    cap = cap_fraction * cost.layout_cost(layout) / num_ranks
    chosen = {}
    for k, g in enumerate(layout.groups):
        if cost.group_cost(g) <= cap:
            continue
        fits = [p for p in sizes if cost.group_cost(g, p) <= cap]
        best = fits[0] if fits else min(sizes, key=lambda p: (cost.group_cost(g, p), p))
        if cost.group_cost(g, best) < cost.group_cost(g):
            chosen[k] = best
    return chosen


def rechunk(group: list[Chunk], size: int) -> list[Chunk]:
    """A dependent group's sequence cut every ``size`` tokens instead::

        10 chunks of 1024 (10,000 tokens), size 2048  ->  5 chunks: 4 x 2048 + 1808
    """
    seq, n = group[0].segments[0].seq_index, sum(c.num_tokens for c in group)
    count = math.ceil(n / size)
    return [Chunk((Segment(seq, j * size, min(size, n - j * size)),), group=group[0].group, index=j, count=count)
            for j in range(count)]


def _assign(layout: ChunkLayout, num_ranks: int, cost: CostModel, sp: dict[int, int], spread: bool,
            longer: bool = True) -> list[RankShare]:
    shares = [RankShare(r) for r in range(num_ranks)]
    # Sequence-parallel groups first, largest size first, each on the aligned block of its size with
    # the lowest load. Blocks nest, so the ranks of one group share every earlier group: their plans
    # reach it at the same step. With ``longer``, a group spread over p ranks is cut into chunks p times
    # longer: each rank computes one chunk's worth of rows per call, in p times fewer calls, all-to-alls,
    # gradient reductions and recomputed chunks.
    for k in sorted(sp, key=lambda k: (-sp[k], -cost.group_cost(layout.groups[k]), k)):
        p = sp[k]
        g = rechunk(layout.groups[k], p * layout.groups[k][0].num_tokens) if longer else layout.groups[k]
        start = min(range(0, num_ranks, p), key=lambda b: (max(shares[r].cost for r in range(b, b + p)), b))
        ranks = tuple(range(start, start + p))
        for j, r in enumerate(ranks):
            shares[r].sp_groups.append([replace(c, shard=Shard(ranks, j)) for c in g])
            shares[r].cost += cost.group_cost(g, p)
    items: list[tuple[float, int, list[Chunk], bool]] = []
    for k, g in enumerate(layout.groups):
        if k not in sp:
            items.append((cost.group_cost(g), k, g, True))
    # spread: each packed sequence is an item of its own (a chunk of one segment); packed per rank below
    pieces = [Chunk((s,)) for c in layout.standalone for s in c.segments] if spread else layout.standalone
    for k, c in enumerate(pieces):
        items.append((cost.chunk_cost(c), len(layout.groups) + k, [c], False))
    items.sort(key=lambda it: (-it[0], it[1]))
    heap = [(s.cost, s.num_chunks, s.rank) for s in shares]
    heapq.heapify(heap)
    for c, _, chunks, dependent in items:
        _, _, r = heapq.heappop(heap)
        share = shares[r]
        if dependent:
            share.groups.append(chunks)
        else:
            share.standalone.extend(chunks)
        share.cost += c
        heapq.heappush(heap, (share.cost, share.num_chunks, r))
    if spread:
        for share in shares:
            share.standalone = pack([(c.num_tokens, c.segments[0].seq_index) for c in share.standalone],
                                    layout.chunk_size)
    return shares


def assign_to_ranks(layout: ChunkLayout, num_ranks: int, cost: CostModel | None = None,
                    sp_max_size: int = 1, spread: bool = True, sp_longer_chunks: bool = True) -> list[RankShare]:
    """Longest-processing-time-first assignment of groups and packed sequences to ranks.

    The items are the dependent groups and, with ``spread`` (the default), the short sequences
    themselves; each rank then packs its own sequences into standalone chunks of ``chunk_size``
    (:func:`pack`). Without ``spread`` the items are ``layout.standalone``'s chunks as packed for
    the whole batch. A rank's cost is the sum of its sequences' costs however they are packed, so
    spreading balances to within one sequence where chunks as items balance to within one chunk::

        512 samples on 64 ranks, 4K chunks: ~4K tokens per rank, i.e. one packed chunk.
        chunks as items:     ranks get 1 or 2 chunks      -> max/mean ~1.4
        sequences as items:  each rank ~4K tokens -> packed into 1-2 chunks of its own -> ~1.01

    The cost of spreading is model calls: a rank runs ``>= ceil(its tokens / chunk_size)`` chunks,
    and the packing is per rank, so a batch has up to one partly filled chunk per rank (chunks as
    items: one per batch). Which rank gets what never changes what is computed (each packed
    sequence is its own causal segment), only the time.

    A dependent group is one item (its K/V state lives on one rank), unless ``sp_max_size`` > 1
    lets the cost model spread it over a sequence-parallel group of ranks (each holding a share of
    every chunk's tokens and of the K/V state's heads; with ``sp_longer_chunks`` the group is first
    cut into chunks p times longer, :func:`rechunk`, so each rank's share is one chunk's worth).
    Items go, most expensive first, to the rank with the lowest cost so far (ties: fewest chunks,
    then lowest rank), which keeps max/mean cost within 4/3 of optimal for the whole items. With
    sequence parallelism, every cap in :data:`SP_THRESHOLDS` is tried (:func:`choose_sp_sizes`) and
    the assignment with the lowest maximum cost wins (ties: fewer spread groups). Ranks may end with
    different chunk counts; the executor pads them to equal steps. Deterministic: a function of the
    layout and the arguments.
    """
    if num_ranks <= 0:
        raise ValueError(f"num_ranks must be > 0, got {num_ranks}")
    cost = cost or CostModel()
    best, best_key = _assign(layout, num_ranks, cost, {}, spread), None
    if sp_max_size > 1 and layout.groups:
        best_key = (max(s.cost for s in best), 0)
        for cap in SP_THRESHOLDS:
            sp = choose_sp_sizes(layout, num_ranks, cost, sp_max_size, cap)
            if not sp:
                continue
            shares = _assign(layout, num_ranks, cost, sp, spread, sp_longer_chunks)
            key = (max(s.cost for s in shares), len(sp))
            if key < best_key:
                best, best_key = shares, key
    return best


def split_size(lengths: Sequence[int], chunk_size: int, num_ranks: int) -> int | None:
    """The largest ``chunk_size / 2^k`` (k >= 1, at least 2 tokens) within half a rank's fair share of
    tokens, or None where that is ``chunk_size`` itself or no sequence is longer (nothing to split)::

        512 samples, ~270K tokens, 64 ranks: ~4.2K tokens per rank; chunk_size 8192 -> 2048
    """
    half_share = sum(lengths) / num_ranks / 2
    size = chunk_size
    while size // 2 >= 2 and size > half_share:
        size //= 2
    if size == chunk_size or not any(size < n <= chunk_size for n in lengths):
        return None
    return size


SPLIT_GAIN = 0.99
"""A split layout is kept when its busiest rank costs below this fraction of the unsplit one's."""


def plan_layout(lengths: Sequence[int], chunk_size: int, num_ranks: int, cost: CostModel | None = None,
                sp_max_size: int = 1, spread: bool = True,
                sp_longer_chunks: bool = True) -> tuple[ChunkLayout, list[RankShare]]:
    """:func:`build_chunks` then :func:`assign_to_ranks`; the layout returned lists, as its standalone
    chunks, those the ranks run (rank 0's first), so its counts are the batch's model calls.

    With sequence parallelism a short sequence that costs more than a rank's fair share cannot be
    balanced whole (512 samples on 64 ranks, 8K chunks: a rank's share is ~4K tokens, a packed
    sequence up to 8K). So the layout whose sequences longer than :func:`split_size` are dependent
    groups (which sequence parallelism may spread) is tried too, and kept when its busiest rank is
    lighter by more than 1% (:data:`SPLIT_GAIN`); it costs model calls (smaller chunks).
    """
    cost = cost or CostModel()
    layout = build_chunks(lengths, chunk_size)
    shares = assign_to_ranks(layout, num_ranks, cost, sp_max_size, spread, sp_longer_chunks)
    split = split_size(lengths, chunk_size, num_ranks) if sp_sizes(num_ranks, sp_max_size) else None
    if split is not None:
        split_layout = build_chunks(lengths, chunk_size, split)
        split_shares = assign_to_ranks(split_layout, num_ranks, cost, sp_max_size, spread, sp_longer_chunks)
        if max(s.cost for s in split_shares) < SPLIT_GAIN * max(s.cost for s in shares):
            layout, shares = split_layout, split_shares
    as_run = {g[0].group: [replace(c, shard=None) for c in g] for s in shares for g in s.sp_groups}
    groups = [as_run.get(g[0].group, g) for g in layout.groups]  # spread groups as cut for their ranks
    return replace(layout, standalone=[c for s in shares for c in s.standalone], groups=groups), shares


def imbalance(costs: Sequence[float]) -> float:
    """max / mean of per-rank costs (1.0 is perfect balance)."""
    mean = sum(costs) / max(1, len(costs))
    return max(costs) / mean if mean > 0 else 1.0
