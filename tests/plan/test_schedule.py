"""Properties of ``ds_chunkflow.plan.schedule`` plans, as data (no model, no process group).

Random layouts are cut with ``build_chunks``, spread with ``assign_to_ranks``, planned with
``build_plan`` for K = 1 .. N + 1 (N = the longest group) and compared instruction by
instruction. One group of N = 4 chunks at K = 1 reads::

    S0 S1 S2 F3 | B3 || R2 | B2 || R1 | B1 || R0 | B0 ReleaseState
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_chunkflow.plan.chunking import Chunk, CostModel, RankShare, Segment, assign_to_ranks, build_chunks
from ds_chunkflow.plan.schedule import (
    Backward,
    Forward,
    JointBackward,
    PadBackward,
    PadForward,
    Recompute,
    ReleaseState,
    StateForward,
    align,
    barrier_makespan,
    barrier_segments,
    build_plan,
    flatten,
    group_steps,
    join_at_barriers,
    join_backwards,
    plan_stats,
)

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PADS = (PadForward, PadBackward)


@st.composite
def plans(draw):
    """``(shares, keep_chunks, offload)``: a few ranks, short and long sequences, K in 1..N+1."""
    chunk_size = draw(st.integers(1, 8))
    short = st.integers(1, chunk_size)
    long = st.integers(chunk_size + 1, chunk_size * 9)
    lengths = draw(st.lists(st.one_of(short, short, long), min_size=1, max_size=14))
    layout = build_chunks(lengths, chunk_size)
    shares = assign_to_ranks(layout, draw(st.integers(1, 4)))
    longest = max((len(g) for g in layout.groups), default=1)
    return shares, draw(st.integers(1, longest + 1)), draw(st.booleans())


def rank_plans(shares, keep, offload):
    return [build_plan(s, keep, offload) for s in shares]


def each_rank(case, aligned: bool):
    """Yields ``(share, flattened plan)`` per rank, plain or after ``align``."""
    shares, keep, offload = case
    built = rank_plans(shares, keep, offload)
    for share, plan in zip(shares, align(built) if aligned else built):
        yield share, flatten(plan)


def events(flat, kinds, group):
    """The chunk indices of ``group`` touched by instructions of ``kinds``, in plan order."""
    return [ins.chunk.index for ins in flat
            if isinstance(ins, kinds) and ins.chunk.is_dependent and ins.chunk.group == group]


both = pytest.mark.parametrize("aligned", [False, True], ids=["plain", "aligned"])


@both
@SETTINGS
@given(plans())
def test_every_chunk_forwarded_once_in_ascending_order(aligned, case):
    """Each chunk gets exactly one Forward or StateForward; a group's in ascending index order."""
    for share, flat in each_rank(case, aligned):
        for g in share.groups:
            assert events(flat, (Forward, StateForward), g[0].group) == list(range(len(g)))
        fwd = [ins.chunk for ins in flat if isinstance(ins, (Forward, StateForward)) and not ins.chunk.is_dependent]
        assert sorted(fwd, key=repr) == sorted(share.standalone, key=repr)


@both
@SETTINGS
@given(plans())
def test_every_chunk_backwarded_once_in_descending_order(aligned, case):
    """Each chunk gets exactly one Backward; a group's in descending index order."""
    for share, flat in each_rank(case, aligned):
        for g in share.groups:
            assert events(flat, Backward, g[0].group) == list(reversed(range(len(g))))
        bwd = [ins.chunk for ins in flat if isinstance(ins, Backward) and not ins.chunk.is_dependent]
        assert sorted(bwd, key=repr) == sorted(share.standalone, key=repr)


@both
@SETTINGS
@given(plans())
def test_state_forwarded_chunks_recompute_right_before_their_backward(aligned, case):
    """Exactly the StateForward'ed chunks are recomputed, once each, in descending order, each
    Recompute directly followed by that chunk's Backward among the group's own instructions."""
    for share, flat in each_rank(case, aligned):
        for g in share.groups:
            state = events(flat, StateForward, g[0].group)
            assert events(flat, Recompute, g[0].group) == state[::-1]
            own = [(type(i), i.chunk.index) for i in flat if isinstance(i, (Forward, StateForward, Recompute, Backward))
                   and i.chunk.is_dependent and i.chunk.group == g[0].group]
            for j in state:
                at = own.index((Recompute, j))
                assert own[at + 1] == (Backward, j)


@both
@SETTINGS
@given(plans())
def test_at_most_k_chunks_hold_activations(aligned, case):
    """Walking the plan, chunks holding on-device activations (Forward without offload or
    Recompute, not yet Backward'ed) never exceed K, per group and in total; a Backward only
    runs on a chunk whose activations exist (on the device or offloaded)."""
    _, keep, _ = case
    for _, flat in each_rank(case, aligned):
        held, offloaded, peak = set(), set(), 0
        for ins in flat:
            if isinstance(ins, Recompute) or (isinstance(ins, Forward) and not ins.offload):
                held.add(ins.chunk)
            elif isinstance(ins, Forward):
                offloaded.add(ins.chunk)
            elif isinstance(ins, Backward):
                assert ins.chunk in held | offloaded
                held.discard(ins.chunk)
                offloaded.discard(ins.chunk)
            peak = max(peak, len(held))
        assert peak <= keep and not held and not offloaded


@SETTINGS
@given(plans())
def test_offload_forwards_instead_of_recomputing(case):
    """With offload_activations there is no StateForward or Recompute; the first N - K chunks
    of a group are the offloaded ones."""
    shares, keep, _ = case
    for share in shares:
        flat = flatten(build_plan(share, keep, offload_activations=True))
        assert not any(isinstance(i, (Recompute, StateForward)) for i in flat)
        for g in share.groups:
            offloaded = [i.chunk.index for i in flat if isinstance(i, Forward) and i.offload and i.chunk.group == g[0].group]
            assert offloaded == list(range(max(0, len(g) - keep)))


@both
@SETTINGS
@given(plans())
def test_release_state_follows_the_groups_last_backward(aligned, case):
    """Each group has one ReleaseState, after its last Backward and after every use of its chunks."""
    for share, flat in each_rank(case, aligned):
        releases = [i.group for i in flat if isinstance(i, ReleaseState)]
        assert sorted(releases) == sorted(g[0].group for g in share.groups)
        for g in share.groups:
            at = flat.index(ReleaseState(g[0].group))
            uses = [k for k, i in enumerate(flat) if hasattr(i, "chunk") and i.chunk.group == g[0].group]
            assert max(uses) < at and isinstance(flat[max(uses)], Backward)


def collective_kinds(flat) -> str:
    kinds = []
    for ins in flat:
        if isinstance(ins, (StateForward, Forward, Recompute, PadForward)):
            kinds.append("F")
        elif isinstance(ins, (Backward, PadBackward)):
            kinds.append("B")
        else:
            assert isinstance(ins, ReleaseState), ins
    return "".join(kinds)


@SETTINGS
@given(plans())
def test_aligned_ranks_issue_the_same_collectives(case):
    """After align, every rank issues the same sequence of forward/backward model calls
    (ReleaseState is the only non-collective instruction), hence the same number of backwards."""
    shares, keep, offload = case
    aligned = align(rank_plans(shares, keep, offload))
    assert len({len(p) for p in aligned}) == 1
    kinds = {collective_kinds(flatten(p)) for p in aligned}
    assert len(kinds) == 1
    for step in zip(*aligned):  # the same shape step by step, so accumulation boundaries line up
        assert len({(len(s.pre), len(s.fwd), len(s.bwd)) for s in step}) == 1


@SETTINGS
@given(plans())
def test_pad_backwards_match_kept_pad_forwards(case):
    """Per rank, PadBackward count == PadForward(keep=True) count, and pad backwards never
    precede their pad forwards."""
    shares, keep, offload = case
    for plan in align(rank_plans(shares, keep, offload)):
        pending = 0
        for ins in flatten(plan):
            if isinstance(ins, PadForward) and ins.keep:
                pending += 1
            elif isinstance(ins, PadBackward):
                pending -= 1
                assert pending >= 0
        assert pending == 0


@SETTINGS
@given(plans())
def test_align_only_adds_pads(case):
    """Dropping pad instructions from an aligned plan gives back the rank's own plan."""
    shares, keep, offload = case
    built = rank_plans(shares, keep, offload)
    for own, padded in zip(built, align(built)):
        assert [i for i in flatten(padded) if not isinstance(i, PADS)] == flatten(own)


@SETTINGS
@given(plans())
def test_short_groups_are_not_recomputed(case):
    """A group with N <= K is forwarded with activations kept and never recomputed."""
    shares, keep, offload = case
    for share in shares:
        for g in share.groups:
            if len(g) <= keep:
                flat = [i for s in group_steps(g, keep, offload) for i in s.instructions()]
                assert [type(i) for i in flat] == [Forward] * len(g) + [Backward] * len(g) + [ReleaseState]


def test_plan_stats_worked_example():
    """Recompute fraction by hand: chunk_size 4, lengths [16, 3, 1] on 2 ranks, K = 1.

    rank 0 holds the group of 4 chunks (16 tokens), rank 1 the standalone chunk [3 + 1]::

        rank 0  S0 S1 S2 F3 | B3 || R2 | B2 || R1 | B1 || R0 | B0
        rank 1  p  p  p  F  | B  || p  | pb || p  | pb || p  | pb     (p = PadForward, pb = PadBackward)

    rank 0 forwards 4 x 4 (first pass) + 3 x 4 (recompute) = 28 tokens, recomputes 12: 12/28 = 3/7;
    rank 1 forwards 4 tokens, recomputes none, and makes 3 + 3 x 2 = 9 pad calls.
    """
    shares = assign_to_ranks(build_chunks([16, 3, 1], 4), 2)
    assert [len(s.groups) for s in shares] == [1, 0] and [len(s.standalone) for s in shares] == [0, 1]
    plans = [build_plan(s, keep_chunks=1) for s in shares]
    s0 = plan_stats(plans[0])
    assert (s0.forward_tokens, s0.recompute_tokens, s0.num_pad_calls) == (28, 12, 0)
    assert s0.recompute_fraction == pytest.approx(3 / 7)
    a0, a1 = (plan_stats(p) for p in align(plans))
    assert a0 == s0
    assert (a1.forward_tokens, a1.recompute_tokens, a1.num_pad_calls, a1.recompute_fraction) == (4, 0, 9, 0.0)
    # K = 2: S0 S1 F2 F3 | B3 B2 || R1 | B1 || R0 | B0  -> 8 of 24 tokens recomputed
    assert plan_stats(build_plan(shares[0], keep_chunks=2)).recompute_fraction == pytest.approx(8 / 24)
    # K = N or offload: nothing recomputed
    assert plan_stats(build_plan(shares[0], keep_chunks=4)).recompute_fraction == 0.0
    assert plan_stats(build_plan(shares[0], keep_chunks=1, offload_activations=True)).recompute_fraction == 0.0


def test_worked_example_plan_reads_as_algorithm_2():
    """N = 4, K = 1 gives exactly S0 S1 S2 F3 B3 R2 B2 R1 B1 R0 B0 ReleaseState."""
    (g,) = build_chunks([16], 4).groups
    flat = flatten(build_plan(RankShare(0, groups=[g]), keep_chunks=1))
    short = [type(i).__name__[0] + (str(i.chunk.index) if hasattr(i, "chunk") else "") for i in flat]
    assert short == ["S0", "S1", "S2", "F3", "B3", "R2", "B2", "R1", "B1", "R0", "B0", "R"]


@pytest.mark.parametrize("keep", [0, -1])
def test_build_plan_rejects_keep_below_one(keep):
    """keep_chunks < 1 raises ValueError naming keep_chunks."""
    with pytest.raises(ValueError, match="keep_chunks"):
        build_plan(RankShare(0), keep)


def test_empty_inputs_give_empty_plans():
    """No chunks: an empty plan; aligning no ranks or empty ranks gives empty plans."""
    assert build_plan(RankShare(0), 1) == [] and align([]) == [] and align([[], []]) == [[], []]


@SETTINGS
@given(plans())
def test_count_alignment_matches_backwards_with_the_fewest_pads(case):
    """Without collective forwards (ZeRO-0/1/2) ranks only need the same number of backwards: the plans
    are left as built and topped up at the end with [PadForward | PadBackward] steps, never more pads
    than the lock-step alignment."""
    shares, keep, offload = case
    built = rank_plans(shares, keep, offload)
    counted = align(built, lockstep=False)
    backwards = {sum(isinstance(i, (Backward, PadBackward)) for i in flatten(p)) for p in counted}
    assert len(backwards) == 1
    for plan, got in zip(built, counted):
        assert got[:len(plan)] == plan  # nothing inside the plan moves
        assert all(s.fwd == [PadForward(keep=True)] and s.bwd == [PadBackward()] for s in got[len(plan):])
    pads = sum(isinstance(i, PADS) for p in counted for i in flatten(p))
    assert pads <= sum(isinstance(i, PADS) for p in align(built) for i in flatten(p))


@SETTINGS
@given(plans())
def test_joined_backwards_cover_k_standalone_chunks_each(case):
    """join_backwards leaves every forward where it was and every dependent chunk's backward as it was;
    each JointBackward is one step's standalone chunks (2..K of them) in reverse forward order; a plan
    of n standalone runs makes sum(ceil(run / K)) backward calls for them; K = 1 changes nothing."""
    shares, keep, offload = case
    for plan in rank_plans(shares, keep, offload):
        joined = join_backwards(plan, keep)
        flat, before = flatten(joined), flatten(plan)
        assert [i for i in flat if not isinstance(i, (Backward, JointBackward))] == \
            [i for i in before if not isinstance(i, Backward)]
        assert [i for i in flat if isinstance(i, Backward) and i.chunk.is_dependent] == \
            [i for i in before if isinstance(i, Backward) and i.chunk.is_dependent]
        for step in joined:
            for ins in step.bwd:
                if isinstance(ins, JointBackward):
                    assert 2 <= len(ins.chunks) <= keep and step.bwd == [ins] and not step.pre
                    assert [f.chunk for f in step.fwd] == list(reversed(ins.chunks))
                    assert not any(c.is_dependent for c in ins.chunks)
        runs = [len(list(g)) for alone, g in itertools.groupby(plan, key=lambda st: not st.fwd[0].chunk.is_dependent)
                if alone]
        calls = sum(len(s.bwd) for s in joined if s.fwd and not s.fwd[0].chunk.is_dependent)
        assert calls == sum(-(-r // keep) for r in runs), (runs, keep)
        if keep == 1:
            assert joined == plan


TOKENS = CostModel(attention=0.0)  # a chunk costs its tokens: forward a third, backward two thirds


def _backward_calls(plan):
    return sum(isinstance(i, (Backward, JointBackward, PadBackward)) for i in flatten(plan))


def test_barrier_joining_fills_the_waits_of_a_dependent_group():
    """ZeRO-2 (every backward meets): rank 0 runs a sequence of three 8-token chunks, K = 4, so its
    backwards close segments of 13.3, 5.3 and 5.3 (cost = tokens); rank 1 runs standalone chunks of 8, 3,
    5 and 4 tokens. K per call puts all four in one backward (20 against 13.3, then two pads: 30.7);
    filled, rank 1's three backwards come after 8 + 3, 5 and 4, each within rank 0's segment, so the
    step takes rank 0's own 24, in as many backward calls."""
    group = build_chunks([24], 8).groups[0]
    alone = [Chunk((Segment(1 + i, 0, n),)) for i, n in enumerate((8, 3, 5, 4))]
    built = [build_plan(RankShare(0, groups=[group]), 4), build_plan(RankShare(1, standalone=alone), 4)]
    per_k = align([join_backwards(p, 4) for p in built], lockstep=False)
    filled = align(join_at_barriers(built, 4, TOKENS), lockstep=False)
    assert barrier_makespan(per_k, TOKENS) == pytest.approx(20 + 2 * 16 / 3)
    assert barrier_makespan(filled, TOKENS) == pytest.approx(24)
    assert [round(x, 1) for x in barrier_segments(filled[1], TOKENS)] == [11, 5, 4]
    assert filled[1][0].bwd == [JointBackward((alone[1], alone[0]))] and filled[1][1].bwd == [Backward(alone[2])]
    assert filled[0] == built[0] and _backward_calls(filled[1]) == _backward_calls(per_k[1]) == 3


@SETTINGS
@given(plans(), st.sampled_from([TOKENS, CostModel(attention=0.05, keep_chunks=2)]))
def test_barrier_joining_keeps_every_chunk_and_never_models_slower(case, cost):
    """Whatever the layout: each rank runs the chunks it was given, its groups' instructions untouched and
    in order; every JointBackward follows its chunks' forwards and holds at most K of them; aligned by
    count, the ranks make the same number of backward calls; and the modelled time when every backward
    meets is never above K per call's, nor the number of backward calls (the filled plan is kept only where
    it is 1% faster with no more calls)."""
    shares, keep, offload = case
    built = rank_plans(shares, keep, offload)
    per_k = align([join_backwards(p, keep) for p in built], lockstep=False)
    got = align(join_at_barriers(built, keep, cost), lockstep=False)
    assert len({_backward_calls(p) for p in got}) == 1
    assert _backward_calls(got[0]) <= _backward_calls(per_k[0])  # no more gradient reductions
    assert barrier_makespan(got, cost) <= barrier_makespan(per_k, cost) + 1e-9
    for plan, new in zip(built, got):
        before, flat = flatten(plan), flatten(new)
        assert sorted(map(repr, (i for i in flat if isinstance(i, Forward)))) == \
            sorted(map(repr, (i for i in before if isinstance(i, Forward))))
        dependent = [i for i in before if not isinstance(i, (Forward, Backward)) or i.chunk.is_dependent]
        assert [i for i in flat if not isinstance(i, (Forward, Backward, JointBackward, PadForward, PadBackward))
                or (isinstance(i, (Forward, Backward)) and i.chunk.is_dependent)] == dependent
        done = set()
        for ins in flat:
            if isinstance(ins, Forward):
                done.add(ins.chunk)
            for chunk in ins.chunks if isinstance(ins, JointBackward) else ():
                assert chunk in done and not chunk.is_dependent
            if isinstance(ins, JointBackward):
                assert 2 <= len(ins.chunks) <= keep
                done -= set(ins.chunks)
    if keep == 1 or len(built) == 1:
        assert join_at_barriers(built, keep, cost) == [join_backwards(p, keep) for p in built]


def test_barrier_joining_keeps_k_per_call_where_filling_is_not_faster():
    """Rank 1's first chunk (100 tokens) is far above rank 0's segments (13.3, 5.3, 5.3): filled, rank 1 would
    pad all three and run everything after (24 + 103); K per call overlaps the 100 with rank 0's first
    segment (103 + 5.3 + 5.3), so that is what is kept."""
    group = build_chunks([24], 8).groups[0]
    alone = [Chunk((Segment(1 + i, 0, n),)) for i, n in enumerate((100, 1, 1, 1))]
    built = [build_plan(RankShare(0, groups=[group]), 4), build_plan(RankShare(1, standalone=alone), 4)]
    assert join_at_barriers(built, 4, TOKENS) == [join_backwards(p, 4) for p in built]
