"""ds_chunkflow.plan.planner, the one planner: data parallelism is its one-stage case (Algorithm 2),
offload is a pass over the forward sequence. (Pipeline orders, timelines and the DeepSpeed schedule:
tests/pipeline/test_schedule.py.)"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_chunkflow.plan.chunking import build_chunks
from ds_chunkflow.plan.instructions import Backward, Forward, Recompute, StateForward, letter
from ds_chunkflow.plan.planner import (
    backward_sequence,
    given_sequence,
    offload_pass,
    plan_stages,
    stage_order,
    stage_orders,
)


def diagram(order):
    return " ".join(f"{letter(op)}{op.chunk.index}" for op in order)


@pytest.mark.parametrize("keep, expected", [
    (1, "S0 S1 S2 F3 B3 R2 B2 R1 B1 R0 B0"),
    (2, "S0 S1 F2 F3 B3 B2 R1 B1 R0 B0"),
    (4, "F0 F1 F2 F3 B3 B2 B1 B0"),
    (9, "F0 F1 F2 F3 B3 B2 B1 B0"),
])
def test_one_stage_one_in_flight_is_algorithm_2(keep, expected):
    """A group of N = 4 chunks on one stage with one chunk in flight: ChunkFlow's Algorithm 2, verbatim."""
    group = build_chunks([16], 4).groups[0]
    fwd = given_sequence(group, keep)
    assert diagram(stage_order(fwd, backward_sequence(fwd, group), limit=1)) == expected


def test_offload_pass_forwards_once_and_never_recomputes():
    group = build_chunks([16], 4).groups[0]
    fwd = offload_pass(given_sequence(group, 1))
    assert fwd == [Forward(c, offload=c.index < 3) for c in group]
    assert diagram(stage_order(fwd, backward_sequence(fwd, group), limit=1)) == "F0 F1 F2 F3 B3 B2 B1 B0"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=8), st.integers(1, 4), st.integers(1, 3),
       st.booleans())
def test_every_chunk_runs_once_and_backward_follows_its_graph(lengths, keep, stages, offload):
    """Every stage: each chunk forwarded once (F or S), recomputed iff S, backward once after its graph."""
    layout = build_chunks(lengths, 6)
    chunks = [c for g in layout.groups for c in g] + layout.standalone
    plan = plan_stages(chunks, stages, keep, offload=offload)
    for order in plan.orders:
        for c in chunks:
            ops = [op for op in order if op.chunk == c]
            kinds = "".join(letter(op) for op in ops)
            assert kinds in ("FB", "SRB"), (c, kinds)
            if offload:
                assert kinds == "FB"
        assert not offload or not any(isinstance(op, (StateForward, Recompute)) for op in order)


def test_chunks_must_be_distinct():
    c = build_chunks([3], 4).standalone[0]
    with pytest.raises(ValueError, match="distinct"):
        plan_stages([c, c], 1)


def test_stage_limits_shrink_with_the_stage():
    """1F1B: stage s keeps P - s chunks in flight, so the first stage forwards furthest ahead."""
    chunks = build_chunks([4] * 6, 4).standalone
    orders = stage_orders([Forward(c) for c in chunks], chunks, 3)
    first_backward = [next(i for i, op in enumerate(o) if isinstance(op, Backward)) for o in orders]
    assert first_backward == [3, 2, 1]
