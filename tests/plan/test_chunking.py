"""Properties of ``ds_chunkflow.plan.chunking`` (Algorithm 1, costs, rank assignment) and ``ds_chunkflow.runtime.batch``.

Lengths come from heavy-tailed mixtures (many short sequences, a few spanning many chunks),
the shape of real SFT data, and chunk sizes 1..64 plus realistic ones::

    chunk_size 4, lengths [6, 3, 1, 2]
    standalone  [s1 s1 s1 s2] [s3 s3]        (BFD: 3 + 1, then 2)
    dependent   [s0 s0 s0 s0] [s0 s0]        (group of sequence 0, positions 0..3 | 4..5)
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_chunkflow.constants import IGNORE_INDEX
from ds_chunkflow.plan.chunking import (
    Chunk,
    CostModel,
    Segment,
    assign_to_ranks,
    build_chunks,
    imbalance,
    plan_layout,
    rechunk,
    split_size,
)
from ds_chunkflow.runtime.batch import (
    count_loss_tokens,
    materialize,
    shifted_targets,
    validate_sequences,
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REALISTIC_CHUNK_SIZES = [128, 1000, 2048, 4096, 8192]
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- strategies


@st.composite
def mixture_lengths(draw, chunk_size: int, max_chunks_per_seq: int, max_short: int):
    """Many short lengths (mostly tiny), boundary lengths, and a few long ones."""
    tiny = st.integers(1, max(1, chunk_size // 8))
    short = st.one_of(tiny, tiny, st.integers(1, chunk_size), st.sampled_from([1, chunk_size]))
    long = st.one_of(st.just(chunk_size + 1), st.integers(chunk_size + 1, chunk_size * max_chunks_per_seq))
    lengths = draw(st.lists(short, max_size=max_short)) + draw(st.lists(long, max_size=4))
    return draw(st.permutations(lengths)) if lengths else [draw(short)]


@st.composite
def lognormal_lengths(draw, chunk_size: int, max_chunks_per_seq: int, max_short: int):
    """A seeded log-normal body plus a log-uniform tail up to ``max_chunks_per_seq`` chunks."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(1, max_short))
    body = rng.lognormal(math.log(max(1.0, chunk_size / 8)), 1.5, size=n)
    tail = np.exp(rng.uniform(math.log(chunk_size), math.log(chunk_size * max_chunks_per_seq), size=n))
    lengths = np.where(rng.random(n) < 0.03, tail, body)
    return [int(x) for x in np.clip(lengths, 1, chunk_size * max_chunks_per_seq)]


@st.composite
def batches(draw, max_chunks_per_seq: int = 40, max_short: int = 150, realistic: bool = True):
    """``(lengths, chunk_size)`` for one global batch."""
    sizes = st.integers(1, 64)
    if realistic:
        sizes = st.one_of(sizes, st.sampled_from(REALISTIC_CHUNK_SIZES))
    chunk_size = draw(sizes)
    kind = draw(st.sampled_from([mixture_lengths, lognormal_lengths]))
    return draw(kind(chunk_size, max_chunks_per_seq, max_short)), chunk_size


def all_chunks(layout) -> list[Chunk]:
    return layout.standalone + [c for g in layout.groups for c in g]


def random_sequences(lengths, seed: int, mask_rate: float) -> list[dict[str, torch.Tensor]]:
    """Random ids; labels = ids with a random share set to -100 (as prompt masking would)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for n in lengths:
        ids = torch.randint(0, 1000, (n,), generator=gen)
        labels = torch.where(torch.rand(n, generator=gen) < mask_rate, IGNORE_INDEX, torch.randint(1000, 2000, (n,), generator=gen))
        seqs.append({"input_ids": ids, "labels": labels})
    return seqs


# --------------------------------------------------------------------------- layout


@SETTINGS
@given(batches())
def test_no_chunk_exceeds_chunk_size(batch):
    """Every chunk holds between 1 and chunk_size tokens."""
    lengths, chunk_size = batch
    layout = build_chunks(lengths, chunk_size)
    assert all(1 <= c.num_tokens <= chunk_size for c in all_chunks(layout))


@SETTINGS
@given(batches())
def test_sequences_reassemble_from_their_segments(batch):
    """Every token of every sequence lies in exactly one chunk at its right position: a
    dependent group tiles its sequence in order (chunk i = tokens [i*C, min((i+1)*C, L))),
    a standalone chunk holds whole sequences."""
    lengths, chunk_size = batch
    layout = build_chunks(lengths, chunk_size)
    assert_tiles(layout, lengths, chunk_size)


@SETTINGS
@given(batches().flatmap(lambda b: st.tuples(st.just(b), st.integers(1, b[1]))))
def test_split_above_cuts_short_sequences_into_groups(case):
    """With ``split_above`` S: a sequence of S < L <= C tokens is a group cut every S tokens, a longer
    one is cut every C as without it, the rest are packed whole; the layout still tiles every sequence."""
    (lengths, chunk_size), split = case
    layout = build_chunks(lengths, chunk_size, split)
    assert_tiles(layout, lengths, chunk_size, split)
    assert all(1 <= c.num_tokens <= chunk_size for c in all_chunks(layout))
    assert sorted(g[0].group for g in layout.groups) == [i for i, n in enumerate(lengths) if n > split]


@pytest.mark.parametrize("split", [0, 5, 2.0])
def test_split_above_outside_one_to_chunk_size_is_rejected(split):
    with pytest.raises(ValueError, match="split_above"):
        build_chunks([3, 9], 4, split)


def assert_tiles(layout, lengths, chunk_size, split=None, spread=None):
    """Standalone chunks hold whole sequences of <= split tokens; group chunk i of a sequence of L tokens
    holds [i*S, min((i+1)*S, L)), S = chunk_size if L > chunk_size else split (times p for a group spread
    over p ranks, ``spread``: sequence -> p); each token once."""
    split, spread = split or chunk_size, spread or {}
    pieces = defaultdict(list)
    for c in layout.standalone:
        assert not c.is_dependent
        for s in c.segments:
            assert (s.start, s.length) == (0, lengths[s.seq_index])
            pieces[s.seq_index].append(s)
    for g in layout.groups:
        seq = g[0].group
        assert lengths[seq] > split
        size = (chunk_size if lengths[seq] > chunk_size else split) * spread.get(seq, 1)
        for i, c in enumerate(g):
            (s,) = c.segments
            assert (c.group, c.index, c.count, s.seq_index) == (seq, i, len(g), seq)
            assert s.start == c.offset == i * size
            assert s.length == min(size, lengths[seq] - i * size)
            pieces[seq].append(s)
    assert sorted(pieces) == list(range(len(lengths)))
    for seq, segs in pieces.items():
        covered = [t for s in segs for t in range(s.start, s.start + s.length)]
        assert covered == list(range(lengths[seq])), seq
    assert layout.num_real_tokens == sum(lengths)


# Run in a fresh interpreter: plans one fixed set of global batches (ties in length, many ranks,
# every K, with and without offload) and prints a canonical JSON of each: the layout, every
# rank's share and every rank's aligned plan.
PLAN_DUMP = r"""
import json, sys
import numpy as np
import torch
from ds_chunkflow.runtime.batch_plan import plan_batch

def chunk(c):
    return [c.group, c.index, c.count, [[s.seq_index, s.start, s.length] for s in c.segments]]

def instruction(ins):
    args = {k: chunk(v) if k == "chunk" else v for k, v in sorted(vars(ins).items())}
    return [type(ins).__name__, args]

out = []
for case in json.load(sys.stdin):
    rng = np.random.default_rng(case["seed"])
    size = case["chunk_size"]
    lengths = [int(n) for n in np.clip(rng.lognormal(np.log(size / 3), 1.2, case["n"]), 1, 12 * size)]
    lengths += [size // 2] * 5 + [2 * size + 1] * 3  # equal lengths: ties
    seqs = [{"input_ids": torch.ones(n, dtype=torch.long), "labels": torch.ones(n, dtype=torch.long)} for n in lengths]
    b = plan_batch(seqs, chunk_size=size, keep_chunks=case["keep"], num_ranks=case["ranks"],
                   offload_activations=case["offload"])
    out.append({
        "standalone": [chunk(c) for c in b.layout.standalone],
        "groups": [[chunk(c) for c in g] for g in b.layout.groups],
        "shares": [{"rank": s.rank, "groups": [[chunk(c) for c in g] for g in s.groups],
                    "standalone": [chunk(c) for c in s.standalone], "cost": repr(s.cost)} for s in b.shares],
        "plans": [[[[instruction(i) for i in part] for part in (st.pre, st.fwd, st.bwd, st.post)] for st in plan]
                  for plan in b.rank_plans],
    })
print(json.dumps(out, sort_keys=True))
"""

PLAN_CASES = [dict(seed=seed, n=n, chunk_size=cs, ranks=ranks, keep=keep, offload=offload)
              for seed, n, cs, ranks, keep, offload in [
                  (0, 150, 64, 8, 1, False), (1, 60, 7, 3, 2, True), (2, 200, 128, 5, 3, False),
                  (3, 40, 16, 1, 1, True), (4, 90, 33, 16, 2, False)]]


def _plans_under_hash_seed(seed: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", PLAN_DUMP], cwd=REPO, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_plans_do_not_depend_on_the_hash_seed():
    """Every data-parallel rank plans the global batch on its own, in its own interpreter, so the
    plan must be a function of the lengths alone: two interpreters with different PYTHONHASHSEED
    (str hashes, hence set and dict-of-str orders, differ) print the same layout, rank shares and
    aligned per-rank plans."""
    procs = {seed: _plans_under_hash_seed(seed) for seed in ("0", "12345")}
    outputs = {}
    for seed, proc in procs.items():
        out, err = proc.communicate(json.dumps(PLAN_CASES), timeout=300)
        assert proc.returncode == 0, err
        outputs[seed] = json.loads(out)
    assert len(outputs["0"]) == len(PLAN_CASES) and all(p["groups"] and p["standalone"] for p in outputs["0"])
    for case, a, b in zip(PLAN_CASES, outputs["0"], outputs["12345"]):
        for key in ("groups", "standalone", "shares", "plans"):
            assert a[key] == b[key], (case, key)
        assert a == b


# --------------------------------------------------------------------------- materialize


MATERIALIZE = settings(SETTINGS, max_examples=60)


def _materialize_all(lengths, chunk_size, seed, mask_rate):
    seqs = random_sequences(lengths, seed, mask_rate)
    layout = build_chunks(lengths, chunk_size)
    return seqs, layout, [(c, materialize(c, seqs)) for c in all_chunks(layout)]


def _segment_slices(chunk: Chunk):
    """The rows of each segment: segments lie in order, back to back."""
    borders = [0, *itertools.accumulate(s.length for s in chunk.segments)]
    return [(s, slice(borders[k], borders[k + 1])) for k, s in enumerate(chunk.segments)]


materialize_cases = st.tuples(batches(max_chunks_per_seq=12, max_short=60, realistic=False),
                              st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.3, 0.9, 1.0]))


@MATERIALIZE
@given(materialize_cases)
def test_every_target_appears_once_at_its_position(case):
    """Target of position t of sequence s is labels[s][t+1]; every label token (t >= 1, not -100)
    is a target exactly once over all chunks."""
    (lengths, chunk_size), seed, mask_rate = case
    seqs, _, inputs = _materialize_all(lengths, chunk_size, seed, mask_rate)
    all_labels = [q["labels"].tolist() for q in seqs]
    seen = defaultdict(int)
    for chunk, x in inputs:
        for s, sl in _segment_slices(chunk):
            labels = all_labels[s.seq_index]
            for k, target in enumerate(x.targets[0, sl].tolist()):
                t = s.start + k
                expected = labels[t + 1] if t + 1 < len(labels) else IGNORE_INDEX
                assert target == expected, (s, t)
                if target != IGNORE_INDEX:
                    seen[(s.seq_index, t + 1)] += 1
    wanted = {(i, t) for i, q in enumerate(all_labels) for t in range(1, len(q)) if q[t] != IGNORE_INDEX}
    assert set(seen) == wanted and all(v == 1 for v in seen.values())


@MATERIALIZE
@given(materialize_cases)
def test_inputs_are_the_segments_tokens(case):
    """input_ids of a chunk are its segments' tokens, in segment order."""
    (lengths, chunk_size), seed, _ = case
    seqs, _, inputs = _materialize_all(lengths, chunk_size, seed, 0.3)
    for chunk, x in inputs:
        expected = torch.cat([seqs[s.seq_index]["input_ids"][s.start:s.start + s.length] for s in chunk.segments])
        assert torch.equal(x.input_ids[0], expected)


@MATERIALIZE
@given(materialize_cases)
def test_packed_sequence_end_never_predicts_the_next_sequence(case):
    """The last position of every sequence (packed or the end of a group) has no target."""
    (lengths, chunk_size), seed, _ = case
    _, _, inputs = _materialize_all(lengths, chunk_size, seed, 0.0)
    for chunk, x in inputs:
        for s, sl in _segment_slices(chunk):
            if s.start + s.length == lengths[s.seq_index]:
                assert x.targets[0, sl][-1].item() == IGNORE_INDEX


@MATERIALIZE
@given(materialize_cases)
def test_dependent_chunk_last_target_is_next_chunks_first_label(case):
    """The last target of dependent chunk i is the label of chunk i+1's first token."""
    (lengths, chunk_size), seed, mask_rate = case
    seqs = random_sequences(lengths, seed, mask_rate)
    layout = build_chunks(lengths, chunk_size)
    for g in layout.groups:
        labels = seqs[g[0].group]["labels"]
        for a, b in itertools.pairwise(g):
            assert materialize(a, seqs).targets[0, -1].item() == labels[b.offset].item()


@MATERIALIZE
@given(materialize_cases)
def test_position_ids_restart_per_sequence_and_continue_across_chunks(case):
    """position_ids restart at 0 for each packed sequence; dependent chunk i starts at i*chunk_size."""
    (lengths, chunk_size), seed, _ = case
    _, _, inputs = _materialize_all(lengths, chunk_size, seed, 0.3)
    for chunk, x in inputs:
        for s, sl in _segment_slices(chunk):
            start = chunk.index * chunk_size if chunk.is_dependent else 0
            assert x.position_ids[0, sl].tolist() == list(range(start, start + s.length))


@MATERIALIZE
@given(materialize_cases)
def test_target_rows_are_the_rows_with_a_target(case):
    """target_rows lists, in order, exactly the rows whose target is not -100; the tensors are [1, T]."""
    (lengths, chunk_size), seed, mask_rate = case
    _, _, inputs = _materialize_all(lengths, chunk_size, seed, mask_rate)
    for chunk, x in inputs:
        assert x.input_ids.shape == x.position_ids.shape == x.targets.shape == (1, chunk.num_tokens)
        assert x.target_rows.tolist() == [t for t, y in enumerate(x.targets[0].tolist()) if y != IGNORE_INDEX]
        assert x.num_loss_tokens == len(x.target_rows)


@MATERIALIZE
@given(materialize_cases)
def test_total_targets_equal_count_loss_tokens(case):
    """Targets over all chunks (with or without precomputed targets) == count_loss_tokens."""
    (lengths, chunk_size), seed, mask_rate = case
    seqs, _, inputs = _materialize_all(lengths, chunk_size, seed, mask_rate)
    pre = [shifted_targets(s["labels"]) for s in seqs]
    assert sum(x.num_loss_tokens for _, x in inputs) == count_loss_tokens(seqs)
    assert sum(materialize(c, seqs, pre).num_loss_tokens for c, _ in inputs) == count_loss_tokens(seqs)


# --------------------------------------------------------------------------- packing quality


def naive_best_fit_decreasing(lengths: list[int], capacity: int) -> list[int]:
    """Reference BFD, O(n * bins): returns the sorted bin fills."""
    fills: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [b for b, f in enumerate(fills) if f + n <= capacity]
        if fits:
            best = max(fits, key=lambda b: fills[b])
            fills[best] += n
        else:
            fills.append(n)
    return sorted(fills)


def optimal_bin_count(sizes: list[int], capacity: int) -> int:
    """Exact bin packing by DP over subsets: dp[mask] = least (bins, fill of the open bin)."""
    if not sizes:
        return 0
    n = len(sizes)
    dp = [None] * (1 << n)
    dp[0] = (1, 0)
    for mask in range(1 << n):
        if dp[mask] is None:
            continue
        bins, fill = dp[mask]
        for i in range(n):
            if not mask >> i & 1:
                cand = (bins, fill + sizes[i]) if fill + sizes[i] <= capacity else (bins + 1, sizes[i])
                nxt = mask | 1 << i
                if dp[nxt] is None or cand < dp[nxt]:
                    dp[nxt] = cand
    return dp[-1][0]


def short_lengths(lengths, chunk_size):
    return [n for n in lengths if n <= chunk_size]


@SETTINGS
@given(batches())
def test_standalone_packing_is_best_fit_decreasing(batch):
    """Standalone chunk fills equal those of a reference Best-Fit-Decreasing over the short sequences."""
    lengths, chunk_size = batch
    layout = build_chunks(lengths, chunk_size)
    fills = sorted(c.num_tokens for c in layout.standalone)
    assert fills == naive_best_fit_decreasing(short_lengths(lengths, chunk_size), chunk_size)


@settings(SETTINGS, max_examples=80)
@given(st.integers(1, 64).flatmap(lambda c: st.tuples(st.lists(st.integers(1, c), min_size=1, max_size=10), st.just(c))))
def test_standalone_count_within_bfd_guarantee_of_optimum(batch):
    """#standalone chunks <= 11/9 OPT + 6/9 (OPT by exhaustive search, <= 10 sequences)."""
    lengths, chunk_size = batch
    bins = len(build_chunks(lengths, chunk_size).standalone)
    opt = optimal_bin_count(lengths, chunk_size)
    assert math.ceil(sum(lengths) / chunk_size) <= opt <= bins <= 11 / 9 * opt + 6 / 9


@SETTINGS
@given(batches())
def test_at_most_one_standalone_chunk_is_underfull(batch):
    """With x = the smallest 'largest sequence' of any standalone chunk (the opener of the last
    chunk), at most one standalone chunk holds <= chunk_size - x tokens; hence
    #standalone <= 1 + (short_total - x) / (chunk_size - x), close to ceil(short_total / chunk_size)
    when short sequences are small."""
    lengths, chunk_size = batch
    layout = build_chunks(lengths, chunk_size)
    if not layout.standalone:
        return
    x = min(max(s.length for s in c.segments) for c in layout.standalone)
    assert sum(c.num_tokens <= chunk_size - x for c in layout.standalone) <= 1
    total = sum(short_lengths(lengths, chunk_size))
    if x < chunk_size:
        assert len(layout.standalone) <= 1 + (total - x) / (chunk_size - x)


def test_sft_like_batch_packs_near_the_lower_bound():
    """On an SFT-like batch (log-normal, 4K chunks) BFD is within 1% + 1 of ceil(short_total / chunk_size)."""
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in np.clip(rng.lognormal(math.log(330), 0.95, size=20000), 1, 4096)]
    layout = build_chunks(lengths, 4096)
    lower = math.ceil(sum(lengths) / 4096)
    assert not layout.groups and lower <= len(layout.standalone) <= 1.01 * lower + 1


# --------------------------------------------------------------------------- costs and ranks


def item_costs(layout, cost: CostModel, spread: bool = False) -> list[float]:
    """Costs of what ``assign_to_ranks`` deals: groups, and packed chunks or (``spread``) short sequences."""
    pieces = [Chunk((s,)) for c in layout.standalone for s in c.segments] if spread else layout.standalone
    return [sum(cost.chunk_cost(c) for c in g) for g in layout.groups] + [cost.chunk_cost(c) for c in pieces]


cost_models = st.sampled_from([CostModel(), CostModel(1.0, 0.0), CostModel(1.0, 0.05), CostModel(0.0, 1.0)])


@SETTINGS
@given(batches(), st.integers(1, 64), cost_models)
def test_every_item_goes_to_exactly_one_rank_and_groups_stay_whole(batch, num_ranks, cost):
    """Chunks as items (``spread=False``): each dependent group (whole, in order) and each standalone
    chunk of the layout is on exactly one rank."""
    lengths, chunk_size = batch
    layout = build_chunks(lengths, chunk_size)
    shares = assign_to_ranks(layout, num_ranks, cost, spread=False)
    assert [s.rank for s in shares] == list(range(num_ranks))
    groups = [tuple(g) for s in shares for g in s.groups]
    standalone = [c for s in shares for c in s.standalone]
    assert sorted(groups, key=lambda g: g[0].group) == sorted((tuple(g) for g in layout.groups), key=lambda g: g[0].group)
    assert sorted(standalone, key=repr) == sorted(layout.standalone, key=repr)
    assert len(standalone) == len(set(standalone)) and len(groups) == len({g[0].group for g in groups})
    assert sum(s.num_tokens for s in shares) == sum(lengths)


@SETTINGS
@given(batches(), st.integers(1, 64), cost_models, st.booleans())
def test_rank_cost_is_the_sum_of_its_chunk_costs(batch, num_ranks, cost, spread):
    """RankShare.cost equals the cost model summed over the rank's chunks (also after a rank packs
    its spread sequences: a chunk's cost is the sum of its sequences')."""
    lengths, chunk_size = batch
    for share in assign_to_ranks(build_chunks(lengths, chunk_size), num_ranks, cost, spread=spread):
        chunks = share.standalone + [c for g in share.groups for c in g]
        assert share.cost == pytest.approx(sum(cost.chunk_cost(c) for c in chunks), rel=1e-9, abs=1e-9)


@SETTINGS
@given(batches(), st.integers(1, 64), cost_models, st.booleans())
def test_lpt_makespan_bound(batch, num_ranks, cost, spread):
    """LPT list-scheduling bound: max rank cost <= max(p_1, mean + (1 - 1/m) p_(m+1)),
    p sorted item costs (an item after the first m lands on a rank at or below the mean);
    the items are groups and packed chunks, or groups and short sequences with ``spread``;
    imbalance() is that max over the mean."""
    lengths, chunk_size = batch
    layout = build_chunks(lengths, chunk_size)
    costs = [s.cost for s in assign_to_ranks(layout, num_ranks, cost, spread=spread)]
    p = sorted(item_costs(layout, cost, spread), reverse=True)
    mean = sum(p) / num_ranks
    bound = max(p[0], mean + (1 - 1 / num_ranks) * (p[num_ranks] if len(p) > num_ranks else 0.0))
    assert max(costs) <= bound * (1 + 1e-9)
    if mean > 0:
        assert imbalance(costs) == pytest.approx(max(costs) / mean)


def optimal_makespan(costs: list[float], num_ranks: int) -> float:
    best = math.inf
    for assignment in itertools.product(range(num_ranks), repeat=len(costs)):
        loads = [0.0] * num_ranks
        for c, r in zip(costs, assignment):
            loads[r] += c
        best = min(best, max(loads))
    return best


@settings(SETTINGS, max_examples=40)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=7), st.integers(4, 16), st.integers(1, 3), cost_models)
def test_lpt_within_four_thirds_of_optimum(lengths, chunk_size, num_ranks, cost):
    """max rank cost <= (4/3 - 1/(3m)) OPT (Graham's LPT bound; OPT by exhaustive search over the
    items dealt: packed chunks, or short sequences with ``spread``).

    The bound is against OPT: against the lower bound max(max item, total / m) it does not hold
    (m = 3, four equal chunks: LPT = OPT = 1.5 x that bound; see the next test)."""
    layout = build_chunks(lengths, chunk_size)
    for spread in (False, True):
        items = item_costs(layout, cost, spread)
        if len(items) > 8:
            continue
        costs = [s.cost for s in assign_to_ranks(layout, num_ranks, cost, spread=spread)]
        assert max(costs) <= (4 / 3 - 1 / (3 * num_ranks)) * optimal_makespan(items, num_ranks) * (1 + 1e-9)


def test_four_equal_chunks_on_three_ranks_is_optimal_at_imbalance_one_and_a_half():
    """Equal chunks that do not divide among ranks: imbalance 1.5 is optimal, not an LPT defect."""
    shares = assign_to_ranks(build_chunks([4, 4, 4, 4], 4), 3)
    assert sorted(s.num_chunks for s in shares) == [1, 1, 2]
    assert imbalance([s.cost for s in shares]) == pytest.approx(1.5)


@SETTINGS
@given(batches(), st.integers(1, 64), cost_models, st.sampled_from([1, 2, 8, 64]), st.booleans())
def test_spread_deals_each_short_sequence_whole_to_one_rank(batch, num_ranks, cost, sp_max_size, longer):
    """Spreading (the default): every short sequence lies whole in exactly one standalone chunk of
    exactly one rank, every group is whole on one rank or on one sequence-parallel block, no chunk
    exceeds chunk_size on a rank, every token is counted once; each rank's chunks are a BFD packing of its
    own sequences; ``plan_layout``'s layout lists exactly the chunks the ranks run, and its groups are
    ``build_chunks``', with or (sequence parallelism only) without ``split_above = split_size``, a group
    spread over p ranks cut into chunks p times longer with ``sp_longer_chunks`` (each rank computes one
    chunk's worth of each), else left as built (each rank computes 1/p of each)."""
    lengths, chunk_size = batch
    layout, shares = plan_layout(lengths, chunk_size, num_ranks, cost, sp_max_size, sp_longer_chunks=longer)
    split = split_size(lengths, chunk_size, num_ranks)
    candidates = [None] + ([split] if split and sp_max_size > 1 and num_ranks > 1 else [])
    spread_over = {g[0].group: g[0].shard.size for s in shares for g in s.sp_groups} if longer else {}

    def as_run(groups):
        return [rechunk(g, spread_over[g[0].group] * g[0].num_tokens) if g[0].group in spread_over else g
                for g in groups]

    built = [as_run(build_chunks(lengths, chunk_size, s).groups) for s in candidates]
    assert layout.groups in built
    assert_tiles(layout, lengths, chunk_size, split if layout.groups != built[0] else None, spread_over)
    assert all(c.local_tokens <= (chunk_size if longer else -(-chunk_size // c.shard.size))
               for s in shares for g in s.sp_groups for c in g)
    short = set(range(len(lengths))) - {g[0].group for g in layout.groups}
    seen = []
    for share in shares:
        for c in share.standalone:
            assert not c.is_dependent and c.shard is None and 1 <= c.num_tokens <= chunk_size
            assert all(s.start == 0 and s.length == lengths[s.seq_index] for s in c.segments)
            seen += [s.seq_index for s in c.segments]
        fills = sorted(c.num_tokens for c in share.standalone)
        mine = [s.length for c in share.standalone for s in c.segments]
        assert fills == naive_best_fit_decreasing(mine, chunk_size)
    assert sorted(seen) == sorted(short)
    whole = [g[0].group for s in shares for g in s.groups]
    spread = {g[0].group for s in shares for g in s.sp_groups}
    assert len(whole) == len(set(whole)) and spread.isdisjoint(whole)
    assert sorted(set(whole) | spread) == [g[0].group for g in layout.groups]
    assert sum(s.num_tokens for s in shares) == sum(lengths) == layout.num_real_tokens
    assert layout.standalone == [c for s in shares for c in s.standalone]


@SETTINGS
@given(batches(), st.integers(1, 64), cost_models, st.sampled_from([2, 8, 64]))
def test_splitting_short_sequences_never_makes_the_busiest_rank_busier(batch, num_ranks, cost, sp_max_size):
    """``plan_layout`` keeps a split layout only when its busiest rank is lighter than the unsplit one's
    by more than 1%: never heavier than assigning ``build_chunks``' layout."""
    lengths, chunk_size = batch
    _, shares = plan_layout(lengths, chunk_size, num_ranks, cost, sp_max_size)
    plain = assign_to_ranks(build_chunks(lengths, chunk_size), num_ranks, cost, sp_max_size)
    assert max(s.cost for s in shares) <= max(s.cost for s in plain)


def test_a_split_that_does_not_pay_is_not_kept():
    """A 6K-token sample among 511 short ones, 64 ranks, 8K chunks: its cost is ~1.5x a rank's share, so
    cut into 2K pieces and spread over 2 ranks it balances (kept; as run, 4K chunks of which each rank
    computes 2K); with an all-to-all dearer than the compute it saves the pieces would stay on one rank,
    as heavy as the whole sample: the packed layout is kept (no extra model calls for nothing)."""
    lengths = [530] * 511 + [6000]
    layout, shares = plan_layout(lengths, 8192, 64, CostModel(), 64)
    assert [len(g) for g in layout.groups] == [2] and sum(len(s.sp_groups) for s in shares) == 2
    assert max(c.local_tokens for s in shares for g in s.sp_groups for c in g) == 2048
    assert imbalance([s.cost for s in shares]) < 1.1
    layout, shares = plan_layout(lengths, 8192, 64, CostModel(all_to_all=50.0), 64)
    assert not layout.groups and not any(s.sp_groups for s in shares)


def test_split_size_halves_the_chunk_size_to_half_a_rank_share():
    """512 samples of ~530 tokens on 64 ranks (~4.2K tokens each), 8K chunks: pieces of 2K; none where
    the share is above the chunk size or no sequence lies between the split and the chunk size."""
    assert split_size([530] * 511 + [6000], 8192, 64) == 2048
    assert split_size([530] * 511 + [6000], 8192, 4) is None
    assert split_size([530] * 512, 8192, 64) is None


@SETTINGS
@given(batches(), st.integers(1, 64), cost_models, st.sampled_from([2, 8, 64]))
def test_spread_balances_to_within_one_item_with_sequence_parallelism(batch, num_ranks, cost, sp_max_size):
    """With sequence-parallel groups placed first, a rank's cost is its sequence-parallel load, or at
    most mean + (1 - 1/m) x the largest dealt item (a group kept whole or one short sequence): the
    rank got its last item when it was the least loaded."""
    lengths, chunk_size = batch
    layout = build_chunks(lengths, chunk_size)
    shares = assign_to_ranks(layout, num_ranks, cost, sp_max_size)
    spread = {g[0].group for s in shares for g in s.sp_groups}
    dealt = [cost.group_cost(g) for g in layout.groups if g[0].group not in spread]
    dealt += [cost.chunk_cost(Chunk((s,))) for c in layout.standalone for s in c.segments]
    mean = sum(s.cost for s in shares) / num_ranks
    sp_only = max(sum(cost.group_cost(g, g[0].shard.size) for g in s.sp_groups) for s in shares)
    bound = max(sp_only, mean + (1 - 1 / num_ranks) * max(dealt, default=0.0))
    assert max(s.cost for s in shares) <= bound * (1 + 1e-9) + 1e-9


@pytest.mark.parametrize("chunk_size", [4096, 8192])
def test_512_samples_on_64_ranks_balance_within_ten_percent(chunk_size):
    """bench_chunking's small global batch (LMSysChat-like lengths, 512 samples, 64 ranks, sequence
    parallelism up to 64 ranks): ``plan_layout`` keeps the busiest rank within 10% of the compute-only
    mean (short sequences dealt one by one; with 8K chunks a packed sequence can outweigh a rank's
    share, so those are split); dealing the batch's packed chunks (about one per rank) does not, in
    the worst of the same five batches."""
    from benchmarks.bench_chunking import lmsys_like_lengths

    cost = CostModel(all_to_all=0.1)
    spread, packed = [], []
    for seed in range(1000, 1005):
        lengths = lmsys_like_lengths(512, seed)
        layout = build_chunks(lengths, chunk_size)
        mean = cost.layout_cost(layout) / 64
        spread.append(max(s.cost for s in plan_layout(lengths, chunk_size, 64, cost, 64)[1]) / mean)
        packed.append(max(s.cost for s in assign_to_ranks(layout, 64, cost, 64, spread=False)) / mean)
    assert max(spread) <= 1.10, spread
    assert max(packed) > 1.10, packed


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_later_dependent_chunk_costs_more(chunk_size):
    """With attention weight > 0 a later chunk of a group costs more than an earlier equal-size
    one (it attends to the prefix); with weight 0 they cost the same."""
    g = build_chunks([3 * chunk_size + 1], chunk_size).groups[0]
    c = CostModel()
    assert c.chunk_cost(g[0]) < c.chunk_cost(g[1]) < c.chunk_cost(g[2])
    flat = CostModel(attention=0.0)
    assert flat.chunk_cost(g[0]) == flat.chunk_cost(g[1]) == flat.chunk_cost(g[2]) == chunk_size


@given(st.integers(2, 5000), st.integers(1, 64), cost_models)
@settings(SETTINGS)
def test_splitting_keeps_attention_pairs(length, chunk_size, cost):
    """A group's total cost equals the cost of its whole sequence as one causal piece."""
    layout = build_chunks([length], chunk_size)
    whole = cost.chunk_cost(Chunk((Segment(0, 0, length),)))
    assert sum(item_costs(layout, cost)) == pytest.approx(whole, rel=1e-12)


@pytest.mark.parametrize("keep, redone", [(1, 4), (2, 3), (5, 0), (9, 0)])
def test_recompute_counts_the_chunks_forwarded_twice(keep, redone):
    """With K = keep_chunks a dependent group of N chunks forwards its first N - K twice: each adds a
    forward's share of its cost to the group's; standalone chunks and K = None add nothing."""
    g = build_chunks([5 * 8], 8).groups[0]
    flat = CostModel(attention=0.0)
    recomputing = CostModel(attention=0.0, keep_chunks=keep, forward_share=0.25)
    assert flat.group_cost(g) == 40
    assert recomputing.group_cost(g) == 40 + redone * 8 * 0.25
    assert recomputing.group_cost(g, 2) == pytest.approx(flat.group_cost(g, 2) + redone * 8 * 0.25 / 2)


def test_recompute_cost_moves_work_off_the_rank_that_recomputes():
    """Two ranks, one 4-chunk group and short sequences: counting the group's recompute (K = 1) gives
    its rank fewer short sequences than a cost model that ignores it."""
    lengths = [64] + [8] * 24
    plain = assign_to_ranks(build_chunks(lengths, 16), 2, CostModel(attention=0.0))
    aware = assign_to_ranks(build_chunks(lengths, 16), 2, CostModel(attention=0.0, keep_chunks=1))

    def short_tokens_beside_the_group(shares):
        return next(s.num_tokens - 64 for s in shares if s.groups)

    assert short_tokens_beside_the_group(aware) < short_tokens_beside_the_group(plain)


def test_packed_attention_is_block_diagonal():
    """Packing two sequences costs their separate costs (no cross-sequence pairs)."""
    c = CostModel(attention=1.0)
    packed = build_chunks([3, 5], 8).standalone[0]
    assert c.chunk_cost(packed) == 8 + 3 * 4 / 2 + 5 * 6 / 2


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("chunk_size", [0, -1, -4096])
def test_non_positive_chunk_size_is_rejected(chunk_size):
    """build_chunks refuses chunk_size <= 0, naming it."""
    with pytest.raises(ValueError, match="chunk_size"):
        build_chunks([3, 4], chunk_size)


@pytest.mark.parametrize("bad", [0, -3])
def test_empty_sequence_is_rejected(bad):
    """build_chunks refuses a sequence of length <= 0, naming its index."""
    with pytest.raises(ValueError, match="sequence 2"):
        build_chunks([3, 4, bad, 5], 4)


@pytest.mark.parametrize("num_ranks", [0, -2])
def test_non_positive_num_ranks_is_rejected(num_ranks):
    """assign_to_ranks refuses num_ranks <= 0, naming it."""
    with pytest.raises(ValueError, match="num_ranks"):
        assign_to_ranks(build_chunks([3], 4), num_ranks)


def _seq(n=4, **override):
    seq = {"input_ids": torch.arange(n), "labels": torch.arange(n)}
    seq.update(override)
    return {k: v for k, v in seq.items() if v is not None}


@pytest.mark.parametrize("bad, field", [
    (_seq(input_ids=None), "input_ids"),
    (_seq(labels=None), "labels"),
    (_seq(input_ids=torch.arange(4, dtype=torch.int32)), "input_ids"),
    (_seq(labels=torch.zeros(4)), "labels"),
    (_seq(labels=[0, 1, 2, 3]), "labels"),
    (_seq(input_ids=torch.arange(4).view(1, 4)), "input_ids"),
    (_seq(labels=torch.arange(5)), "labels"),
])
def test_validate_sequences_names_index_and_field(bad, field):
    """validate_sequences rejects a missing key, a wrong dtype/shape or mismatched lengths,
    naming the sequence index and the field."""
    with pytest.raises(ValueError, match=rf"sequences\[1\].*{field}"):
        validate_sequences([_seq(), bad, _seq()])


def test_validate_sequences_rejects_empty_and_returns_lengths():
    """An empty sequence is refused by index; valid ones give their lengths."""
    with pytest.raises(ValueError, match=r"sequences\[0\]"):
        validate_sequences([_seq(0)])
    assert validate_sequences([_seq(3), _seq(1)]) == [3, 1]
