"""Tests for ds_chunkflow/pipeline: the state-aware 1F1B plan, its simulator, its DeepSpeed schedule.

Pure CPU: schedules are checked as data (``list(schedule)``), and a small rendezvous executor
runs every stage's instruction stream with blocking send/receive semantics.
"""

from __future__ import annotations

import collections
import itertools

import pytest
from deepspeed.runtime.pipe.schedule import (
    BackwardPass,
    ForwardPass,
    LoadMicroBatch,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
    TrainSchedule,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_chunkflow.pipeline import ChunkFlowTrainSchedule, simulate, stage_steps
from ds_chunkflow.pipeline.schedule import RecomputeForwardPass, StateForwardPass
from ds_chunkflow.plan.chunking import build_chunks
from ds_chunkflow.plan.instructions import letter
from ds_chunkflow.plan.simulate import SimResult

PAPER = [4, 2, 1, 1]  # the paper's worked example: 4 stages, sequences of 4, 2, 1, 1 units


def chunk_list(lengths, chunk_size):
    layout = build_chunks(lengths, chunk_size)
    return [c for g in layout.groups for c in g] + layout.standalone


# --------------------------------------------------------------------------- paper example


def test_paper_plain_1f1b_bubble():
    """Plain 1F1B over sequences of 4, 2, 1, 1 units on 4 stages idles 57.14% of the time."""
    assert simulate(PAPER, 4).bubble_ratio == pytest.approx(4 / 7, abs=1e-4)


def test_paper_equal_micro_batches_bubble():
    """Four equal micro-batches of 2 units on 4 stages idle (P-1)/(m+P-1) = 42.86%."""
    assert simulate([2, 2, 2, 2], 4).bubble_ratio == pytest.approx(3 / 7, abs=1e-4)


@pytest.mark.parametrize("keep, ours, paper", [(1, 18 / 44, 0.541), (2, 20 / 44, 0.478)])
def test_paper_chunkflow_beats_paper(keep, ours, paper):
    """ChunkFlow with chunk_size 2 on the paper example idles less than the paper reports."""
    r = simulate(PAPER, 4, chunk_size=2, keep_chunks=keep)
    assert [c.num_tokens for c in r.chunks] == [2, 2, 2, 2] and r.chunks[0].count == 2
    assert r.bubble_ratio == pytest.approx(ours, abs=1e-4)
    assert r.bubble_ratio < paper


def test_plain_order_is_deepspeed_train_schedule():
    """Without dependent chunks, every stage runs DeepSpeed's TrainSchedule compute order."""
    for stages in range(1, 6):
        for m in range(1, 9):
            r = simulate([3] * m, stages)
            for s in range(stages):
                counts = {"F": 0, "B": 0}
                ds = []
                for step in TrainSchedule(m, stages, s):
                    for cmd in step:
                        kind = {ForwardPass: "F", BackwardPass: "B"}.get(type(cmd))
                        if kind:
                            ds.append((kind, counts[kind]))
                            counts[kind] += 1
                assert [(letter(op), r.plan.micro_batch[op.chunk]) for op in r.plan.orders[s]] == ds


# --------------------------------------------------------------------------- plan invariants


def check_plan(r, keep):
    """Every chunk F/S once, R once iff S, B once, on every stage; dependency orders hold."""
    chunks = r.chunks
    for s, order in enumerate(r.plan.orders):
        pos = {(letter(op), r.plan.micro_batch[op.chunk]): i for i, op in enumerate(order)}
        assert len(pos) == len(order)
        for mb, c in enumerate(chunks):
            kept = c.group is None or c.index >= c.count - keep
            assert (("F", mb) in pos) == kept and (("S", mb) in pos) == (not kept)
            assert (("R", mb) in pos) == (not kept) and ("B", mb) in pos
            fwd = pos[("F" if kept else "S", mb)]
            own = fwd if kept else pos[("R", mb)]
            assert fwd <= own < pos[("B", mb)]
        for mb, c in enumerate(chunks):
            if c.group is None or c.index == 0:
                continue
            p = next(i for i, d in enumerate(chunks) if d.group == c.group and d.index == c.index - 1)
            fp, fm = (pos[("F", m)] if ("F", m) in pos else pos[("S", m)] for m in (p, mb))
            assert fp < fm, "forward ascending within a group"
            assert pos[("B", mb)] < pos[("B", p)], "backward descending within a group"
            last = max((i for i, d in enumerate(chunks) if d.group == c.group), key=lambda i: chunks[i].index)
            if ("R", p) in pos:
                assert pos[("F", last)] < pos[("R", p)], "recompute after the group's forwards"


def check_timeline(r):
    """Ops never overlap on a stage and every op starts after its inputs exist."""
    end = {}
    for s, row in enumerate(r.timeline):
        for (a0, b0, *_), (a1, *_) in itertools.pairwise(row):
            assert b0 <= a1 + 1e-9
        for a, b, kind, mb in row:
            end[(s, "fwd" if kind in "FS" else kind, mb)] = (a, b)
    last = len(r.timeline) - 1
    for (s, phase, mb), (a, _) in end.items():
        if phase in ("fwd", "R") and s > 0:
            assert end[(s - 1, phase, mb)][1] <= a + 1e-9
        if phase == "B":
            src = (s + 1, "B", mb) if s < last else (s, "R" if (s, "R", mb) in end else "fwd", mb)
            assert end[src][1] <= a + 1e-9


# --------------------------------------------------------------------------- schedule as data


def links(steps):
    """Per stage: (messages with the previous stage, messages with the next stage) in order."""
    prev, nxt = [], []
    for cmd in (c for step in steps for c in step):
        if isinstance(cmd, (RecvActivation, SendGrad)):
            prev.append((type(cmd) is RecvActivation, cmd.micro_batch))
        elif isinstance(cmd, (SendActivation, RecvGrad)):
            nxt.append((type(cmd) is SendActivation, cmd.micro_batch))
    return prev, nxt


def rendezvous(programs, chunks, recomputed):
    """Run flat instruction lists with blocking send/recv; check every buffer holds the right chunk."""
    n = len(programs)
    pos = [0] * n
    inputs, outputs, labels = [{} for _ in range(n)], [{} for _ in range(n)], [{} for _ in range(n)]
    grad_layer, done_bwd = [None] * n, [set() for _ in range(n)]
    pairs = {SendActivation: (1, RecvActivation), SendGrad: (-1, RecvGrad)}
    progress = True
    while progress:
        progress = False
        for s in range(n):
            while pos[s] < len(programs[s]):
                cmd = programs[s][pos[s]]
                b, mb = getattr(cmd, "buffer_id", None), getattr(cmd, "micro_batch", None)
                if type(cmd) in pairs:
                    step, recv_type = pairs[type(cmd)]
                    peer = s + step
                    other = programs[peer][pos[peer]] if pos[peer] < len(programs[peer]) else None
                    if type(other) is not recv_type:
                        break
                    assert other.micro_batch == mb, f"stage {s} sends {mb}, stage {peer} expects {other.micro_batch}"
                    if recv_type is RecvActivation:
                        assert outputs[s][b][0] == mb
                        inputs[peer][other.buffer_id] = outputs[s][b]
                    else:
                        assert inputs[s][b][0] == mb and mb in done_bwd[s]
                        assert outputs[peer][other.buffer_id][0] == mb, "RecvGrad sizes from its outputs"
                        grad_layer[peer] = mb
                    pos[peer] += 1
                elif type(cmd) in (RecvActivation, RecvGrad):
                    break
                elif type(cmd) is LoadMicroBatch:
                    inputs[s][b] = (mb, "load") if s == 0 else inputs[s].get(b)
                    labels[s][b] = mb
                elif type(cmd) in (ForwardPass, StateForwardPass, RecomputeForwardPass):
                    phase = "R" if type(cmd) is RecomputeForwardPass else "fwd"
                    assert inputs[s][b][0] == mb and inputs[s][b][1] in (("load",) if s == 0 else (phase,))
                    if s == n - 1:
                        assert labels[s][b] == mb
                    outputs[s][b] = (mb, phase)
                elif type(cmd) is BackwardPass:
                    assert outputs[s][b] == (mb, "R" if mb in recomputed else "fwd")
                    assert s == n - 1 or grad_layer[s] == mb
                    done_bwd[s].add(mb)
                pos[s] += 1
                progress = True
    assert all(p == len(prog) for p, prog in zip(pos, programs)), f"deadlock at {pos}"


KIND = {ForwardPass: "F", StateForwardPass: "S", RecomputeForwardPass: "R", BackwardPass: "B"}


def check_stage(r, s, steps, num_buffers):
    """Stage ``s``'s stream on its own, for every stage including the middle ones: its compute ops
    are the plan's (kind and chunk); the first and last stages load every chunk once, in
    ``load_order``, right before its first forward, the others never; each link carries one
    activation per F/S/R and one gradient per B of every chunk, received before the op that
    consumes it and sent after the op that produces it; the optimizer closes the last step."""
    n, order = r.num_stages, r.plan.orders[s]
    flat = [c for step in steps for c in step]
    assert [(KIND[type(c)], c.micro_batch) for c in flat if type(c) in KIND] == \
        [(letter(op), r.plan.micro_batch[op.chunk]) for op in order], f"stage {s}: compute differs from the plan"
    assert all(c.buffer_id < num_buffers for c in flat if hasattr(c, "buffer_id"))
    assert [type(c).__name__ for c in steps[-1][-3:]] == ["ReduceTiedGrads", "ReduceGrads", "OptimizerStep"]

    loads = [i for i, c in enumerate(flat) if type(c) is LoadMicroBatch]
    load_order = [r.plan.micro_batch[op.chunk] for op in r.plan.forward if letter(op) in ("F", "S")]
    assert [flat[i].micro_batch for i in loads] == (load_order if s in (0, n - 1) else []), f"stage {s} loads"
    for i in loads:
        nxt = flat[i + 1]
        assert type(nxt) in (ForwardPass, StateForwardPass) and (nxt.micro_batch, nxt.buffer_id) == \
            (flat[i].micro_batch, flat[i].buffer_id), f"stage {s}: load not right before its forward"

    expected = collections.Counter((letter(op) != "B", r.plan.micro_batch[op.chunk]) for op in order)
    prev, nxt = links(steps)
    assert collections.Counter(prev) == (expected if s > 0 else collections.Counter()), f"stage {s}, prev link"
    assert collections.Counter(nxt) == (expected if s < n - 1 else collections.Counter()), f"stage {s}, next link"
    received, produced, grads_due = collections.Counter(), collections.Counter(), set()
    for c, d in itertools.pairwise(flat + [None]):
        mb = getattr(c, "micro_batch", None)
        if type(c) is RecvActivation:
            received[mb] += 1
        elif type(c) in (ForwardPass, StateForwardPass, RecomputeForwardPass):
            if s > 0:
                assert received.pop(mb, 0) == 1, f"stage {s}: {c} without exactly one received input"
            produced[mb] += 1
        elif type(c) is SendActivation:
            assert produced.pop(mb, 0) == 1, f"stage {s}: {c} sends what no forward produced"
        elif type(c) is RecvGrad:  # DeepSpeed receives gradients into one shared buffer
            assert type(d) is BackwardPass and d.micro_batch == mb, f"stage {s}: {c} not right before its backward"
        elif type(c) is BackwardPass and s > 0:
            grads_due.add(mb)
        elif type(c) is SendGrad:
            assert mb in grads_due, f"stage {s}: {c} before its backward"
            grads_due.remove(mb)
    assert not received and not grads_due and (s == n - 1 or not produced), f"stage {s}: messages left over"


def check_schedule(r, keep):
    """Every stage's stream is right on its own (``check_stage``), neighbouring stages exchange the
    same messages in the same order on every link, and the streams run together."""
    n = r.num_stages
    built = [stage_steps(r.plan, n, s) for s in range(n)]
    for s, (steps, num_buffers) in enumerate(built):
        check_stage(r, s, steps, num_buffers)
    for s in range(n - 1):
        assert links(built[s][0])[1] == links(built[s + 1][0])[0], f"link {s} -> {s + 1}"
    recomputed = {r.plan.micro_batch[op.chunk] for op in r.plan.forward if letter(op) == "R"}
    rendezvous([[c for step in steps for c in step] for steps, _ in built], r.chunks, recomputed)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 24), min_size=1, max_size=10), chunk_size=st.integers(1, 8),
       stages=st.integers(2, 8), keep=st.integers(1, 13), attention=st.sampled_from([0.0, 0.05]))
def test_random_mixes(lengths, chunk_size, stages, keep, attention):
    """Random chunk mixes: plan invariants, timeline causality, matched sends, no deadlock, bubble in [0,1)."""
    r = simulate(lengths, stages, chunk_size, keep, attention_cost=attention)
    check_plan(r, keep)
    check_timeline(r)
    check_schedule(r, keep)
    assert 0.0 <= r.bubble_ratio < 1.0


def test_lagging_stage_keeps_state_only_input():
    """A recompute's input never lands in a buffer before the stage's state-only forward used it."""
    r = simulate([6, 35], 8, chunk_size=1, keep_chunks=1, attention_cost=0.05, search_iters=10)
    check_schedule(r, 1)


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=2, max_size=10), stages=st.integers(2, 6),
       keep=st.integers(1, 4))
def test_search_keeps_invariants(lengths, stages, keep):
    """The local search never lengthens the makespan and keeps every ordering invariant."""
    base = simulate(lengths, stages, 4, keep, attention_cost=0.05)
    r = simulate(lengths, stages, 4, keep, attention_cost=0.05, search_iters=25)
    assert r.makespan <= base.makespan + 1e-9
    check_plan(r, keep)
    check_schedule(r, keep)


@pytest.mark.parametrize("stages", range(2, 9))
def test_every_keep_and_strategy(stages):
    """For K = 1..N+1 and every forward-sequence strategy, the schedule is consistent and runs."""
    lengths = [23, 9, 3, 5, 1, 2, 12, 4]
    groups = build_chunks(lengths, 4).groups
    for keep in range(1, max(len(g) for g in groups) + 2):
        for strategy in ("given", "fill", "fill_small", "blocks", "blocks_small"):
            r = simulate(lengths, stages, 4, keep, strategy=strategy)
            check_plan(r, keep)
            check_schedule(r, keep)


@pytest.mark.parametrize("stages, keep", [(2, 1), (4, 2), (8, 3)])
def test_peak_activations_bounded(stages, keep):
    """Stage s holds at most P - s + K - 1 chunks' activations (1F1B's P - s, plus a kept group)."""
    r = simulate([40, 3, 7, 1, 30, 2, 2, 5, 16, 4], stages, 4, keep)
    assert all(p <= stages - s + keep - 1 for s, p in enumerate(r.peak_in_flight))


def test_keep_all_means_no_recompute():
    """K >= N: no chunk is recomputed and no time is spent recomputing."""
    r = simulate([17, 3, 2], 4, chunk_size=4, keep_chunks=5)
    assert r.recompute_time == 0 and not any(letter(op) in "RS" for op in r.plan.forward)


@pytest.mark.parametrize("stages", range(2, 9))
def test_schedule_class(stages):
    """ChunkFlowTrainSchedule on every stage of 2..8: all stages plan alike, each yields its own
    ``stage_steps`` (fresh objects every pass) with that many buffers, and the whole set is a
    consistent schedule (``check_schedule``)."""
    chunks = chunk_list([9, 3, 2, 1, 6, 13], 3)
    scheds = [ChunkFlowTrainSchedule(chunks, stages, s, keep_chunks=1) for s in range(stages)]
    assert all(sched.plan.forward == scheds[0].plan.forward for sched in scheds)
    assert sorted(scheds[0].load_order) == list(range(len(chunks)))

    def as_data(steps):
        return [[(type(c), vars(c)) for c in step] for step in steps]

    for s, sched in enumerate(scheds):
        steps = list(sched)
        expected, num_buffers = stage_steps(sched.plan, stages, s)
        assert as_data(steps) == as_data(expected) and sched.num_pipe_buffers() == num_buffers
        again = list(sched)
        assert as_data(again) == as_data(steps) and again[0][0] is not steps[0][0]
    r = SimResult(stages, chunks, scheds[0].plan, 1)
    check_plan(r, 1)
    check_schedule(r, 1)
    assert "RecomputeForwardPass(buffer_id=" in repr(RecomputeForwardPass(0, micro_batch=3))
