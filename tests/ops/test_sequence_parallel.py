"""Sequence parallelism's pure parts: which groups are spread, where, the shards, the plan order,
the padded shard inputs, and the refusals. Exactness on 2 ranks: test_engine_distributed.py (training),
and here the attention with sinks and softcap under the all-to-all (each rank its heads' sinks)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_chunkflow.config import ConfigError, split_config
from ds_chunkflow.constants import IGNORE_INDEX
from ds_chunkflow.ops.sequence_parallel import SequenceParallelRefused, check_heads, shard_inputs
from ds_chunkflow.plan.chunking import CostModel, Shard, assign_to_ranks, build_chunks
from ds_chunkflow.plan.schedule import align, build_plan, flatten
from ds_chunkflow.runtime.batch import materialize

COST = CostModel(attention=1 / (6 * 512), all_to_all=0.1)


@st.composite
def heavy_tailed(draw):
    """A global batch with a few long samples among short ones, a rank count and a max SP size."""
    chunk = draw(st.sampled_from([8, 16]))
    short = draw(st.lists(st.integers(1, chunk), min_size=0, max_size=30))
    long = draw(st.lists(st.integers(chunk + 1, 40 * chunk), min_size=1, max_size=4))
    lengths = draw(st.permutations(short + long))
    return lengths, chunk, draw(st.sampled_from([2, 4, 8])), draw(st.sampled_from([2, 4, 8]))


@settings(max_examples=60, deadline=None)
@given(heavy_tailed())
def test_spread_groups_tile_their_chunks_on_aligned_blocks(case):
    """Every chunk of a spread group is on every rank of one aligned power-of-two block, shard j on
    rank j of it; the shards' rows tile the chunk exactly once; every other chunk is on one rank."""
    lengths, chunk, world, max_sp = case
    layout = build_chunks(lengths, chunk)
    shares = assign_to_ranks(layout, world, COST, max_sp)
    placed = {}
    for share in shares:
        for g in share.sp_groups:
            ranks = g[0].shard.ranks
            p = len(ranks)
            assert p <= max_sp and world % p == 0 and p & (p - 1) == 0 and ranks[0] % p == 0, ranks
            assert ranks == tuple(range(ranks[0], ranks[0] + p))
            assert share.rank == ranks[g[0].shard.index]
            for c in g:
                placed.setdefault((c.group, c.index), []).append(c)
        for c in [c for g in share.groups for c in g] + share.standalone:
            assert c.shard is None
            assert (c.group, c.index, c.segments) not in placed
            placed[(c.group, c.index, c.segments)] = [c]
    for key, copies in placed.items():
        if copies[0].shard is None:
            continue
        t = copies[0].num_tokens
        rows = sorted(c.shard.rows(t) for c in copies)
        assert rows[0][0] == 0 and rows[-1][1] == t, rows
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:])), rows
        assert sorted(c.shard.index for c in copies) == list(range(len(copies)))
    spread = {k[0] for k, v in placed.items() if v[0].shard is not None}
    kept = {c.group for s in shares for g in s.groups for c in g}
    assert spread.isdisjoint(kept) and spread | kept == {i for i, n in enumerate(lengths) if n > chunk}


def _unsharded(ins):
    """An instruction with its chunk's shard index dropped: what the ranks of a block run alike."""
    c = getattr(ins, "chunk", None)
    return (type(ins).__name__, None if c is None else (c.group, c.index, c.shard and c.shard.ranks))


@settings(max_examples=60, deadline=None)
@given(heavy_tailed(), st.integers(1, 3), st.booleans())
def test_ranks_of_a_spread_group_reach_each_of_its_chunks_at_the_same_instruction(case, keep, lockstep):
    """After alignment (lock-step, ZeRO-3; or counts only, ZeRO-0/1/2), each chunk of a spread group is
    forwarded and backwarded at the same instruction index on every rank of its block (their all-to-alls
    meet), and nowhere else; and the ranks of a block run the same instructions before it (same
    backwards: the gradient reductions they pass through meet too), which is what makes count alignment
    deadlock-free."""
    lengths, chunk, world, max_sp = case
    shares = assign_to_ranks(build_chunks(lengths, chunk), world, COST, max_sp)
    plans = [flatten(p) for p in align([build_plan(s, keep) for s in shares], lockstep)]
    where = {}
    for rank, plan in enumerate(plans):
        for i, ins in enumerate(plan):
            c = getattr(ins, "chunk", None)
            if c is not None and c.shard is not None:
                where.setdefault((type(ins).__name__, c.group, c.index), {})[rank] = (i, c.shard.ranks)
    for key, by_rank in where.items():
        ranks = next(iter(by_rank.values()))[1]
        assert sorted(by_rank) == list(ranks), (key, by_rank)
        assert len({i for i, _ in by_rank.values()}) == 1, (key, by_rank)
        i = next(iter(by_rank.values()))[0]
        assert len({tuple(map(_unsharded, plans[r][:i])) for r in ranks}) == 1, (key, ranks)


def test_dominant_sample_is_spread_and_lowers_the_maximum():
    """One sample holding most of the cost: without sequence parallelism the busiest rank carries it
    all; with it the sample is spread and the maximum per-rank cost falls; a balanced batch stays
    data-parallel."""
    lengths = [200] * 30 + [16000]
    layout = build_chunks(lengths, 1024)
    plain = assign_to_ranks(layout, 8, COST)
    spread = assign_to_ranks(layout, 8, COST, sp_max_size=8)
    assert sum(len(s.sp_groups) for s in spread) > 0
    assert max(s.cost for s in spread) < 0.5 * max(s.cost for s in plain)
    balanced = build_chunks([2000] * 16, 1024)
    assert all(not s.sp_groups for s in assign_to_ranks(balanced, 8, COST, sp_max_size=8))


def test_all_to_all_cost_keeps_groups_whole_when_it_outweighs_compute():
    """With an all-to-all as dear as the compute it saves, no group is spread."""
    layout = build_chunks([200] * 30 + [16000], 1024)
    dear = CostModel(attention=1 / (6 * 512), all_to_all=50.0)
    assert all(not s.sp_groups for s in assign_to_ranks(layout, 8, dear, sp_max_size=8))


def test_shard_inputs_pad_the_last_rows_without_targets():
    """T = 4 over 3 ranks: rows [0, 2), [2, 4), and 2 pad rows on the last rank (pad id, no target)."""
    seqs = [{"input_ids": torch.arange(10, 30), "labels": torch.arange(10, 30)}]
    layout = build_chunks([20], 8)
    last = layout.groups[0][-1]  # tokens 16..19 (4 rows)
    assert last.num_tokens == 4
    full = materialize(last, seqs)
    a = shard_inputs(full, Shard((0, 1, 2), 0), pad_token_id=7)
    c = shard_inputs(full, Shard((0, 1, 2), 2), pad_token_id=7)
    assert a.input_ids.tolist() == [[26, 27]] and a.targets.tolist() == [[27, 28]]
    assert c.input_ids.tolist() == [[7, 7]] and c.targets.tolist() == [[IGNORE_INDEX, IGNORE_INDEX]]
    b = shard_inputs(full, Shard((0, 1, 2), 1), pad_token_id=7)
    assert b.input_ids.tolist() == [[28, 29]] and b.targets.tolist() == [[29, IGNORE_INDEX]]
    assert b.position_ids.tolist() == [[18, 19]]


def test_the_group_brings_its_all_to_all():
    """ops/ imports no DeepSpeed: the exchange is the one the group was given (the engine gives DeepSpeed's),
    called with that group, once each way; the shards come back as the runtime's ChunkInputs."""
    from ds_chunkflow.ops.sequence_parallel import SequenceParallelGroup, ulysses_chunk
    from ds_chunkflow.runtime.batch import ChunkInputs

    calls = []

    def exchange(group, x):  # a group of 2 whose parts all stay here: enough to see who is called with what
        calls.append((group, tuple(x.shape)))
        return x

    sp = ulysses_chunk(Shard((0, 1), 0), 6, {(0, 1): SequenceParallelGroup("g01", exchange)})
    x = torch.randn(1, 4, 3, 2)  # [1, H, T/P, d]
    gathered = sp.gather_heads(x)
    assert gathered.shape == (1, 2, 6, 2) and calls == [("g01", (2, 1, 2, 3, 2))]
    assert sp.scatter_heads(gathered).shape == (1, 4, 3, 2) and calls[1][0] == "g01"
    with pytest.raises(RuntimeError, match=r"no sequence-parallel process group"):
        ulysses_chunk(Shard((2, 3), 0), 6, {(0, 1): SequenceParallelGroup("g01", exchange)})
    seqs = [{"input_ids": torch.arange(10, 30), "labels": torch.arange(10, 30)}]
    assert type(shard_inputs(materialize(build_chunks([20], 8).groups[0][0], seqs), Shard((0, 1), 1), 0)) is ChunkInputs


def test_head_counts_the_size_does_not_divide_are_refused():
    from ds_chunkflow.testing.models import tiny_config

    check_heads(tiny_config("qwen2"), 2)  # 4 heads over 2 KV heads
    with pytest.raises(SequenceParallelRefused, match="num_key_value_heads = 2"):
        check_heads(tiny_config("qwen2"), 4)


@pytest.mark.parametrize("section, pipeline, match", [
    ({"max_size": 3}, False, "power of two"),
    ({"max_size": 2}, True, "pipeline"),
    ({"max_size": 2, "bogus": 1}, False, "sequence_parallel.bogus: unknown key"),
])
def test_sequence_parallel_config_refusals(section, pipeline, match):
    with pytest.raises(ConfigError, match=match):
        split_config({"chunkflow": {"sequence_parallel": section}}, pipeline=pipeline)


@pytest.mark.distributed
def test_sinks_and_softcap_under_sequence_parallelism(tmp_path):
    """On 2 gloo ranks, each holding a block of the heads after the all-to-all, a packed chunk with attention
    sinks (each rank folds its own heads' sinks) and a logit softcap equals the whole-chunk call: its rows of the
    output and of the q, k, v gradients, and the two ranks' sinks gradients (zero outside their heads) sum to
    the whole call's."""
    from ds_chunkflow.testing.spawn import run_ranks
    from tests.helpers.sequence_parallel_workers import sp_sink_softcap_attention

    out = tmp_path / "sp.pt"
    run_ranks(sp_sink_softcap_attention, 13, str(out), timeout=120)
    results = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for r in results:
        assert r["out_err"] < 1e-12 and max(r["grad_errs"]) < 1e-12, r
    assert all(r["sinks_grad"][2 * i:2 * i + 2].abs().min() > 0 for i, r in enumerate(results))
    assert all(r["sinks_grad"][2 - 2 * i:4 - 2 * i].abs().max() == 0 for i, r in enumerate(results))
    torch.testing.assert_close(results[0]["sinks_grad"] + results[1]["sinks_grad"], results[0]["ref_sinks_grad"],
                               rtol=0, atol=1e-12)


def _simulated_gather(method, xs_per_rank, num_tokens):
    """Runs ``method`` of a UlyssesChunk on every simulated rank of one group, in one process: a first
    pass records what each rank sends, a second answers every all-to-all from the others' records."""
    from ds_chunkflow.ops.sequence_parallel import UlyssesChunk

    size = len(xs_per_rank)
    sent: dict[tuple[int, int], torch.Tensor] = {}

    def run(rank, answer):
        calls = []

        def all_to_all(group, x):
            k = len(calls)
            calls.append(k)
            sent[(rank, k)] = x
            if not answer:
                return torch.zeros_like(x)
            return torch.stack([sent[(j, k)][rank] for j in range(size)])

        out = getattr(UlyssesChunk(None, size, num_tokens, all_to_all), method)(*xs_per_rank[rank])
        return out, len(calls)

    for r in range(size):
        run(r, answer=False)
    return [run(r, answer=True) for r in range(size)]


def test_q_k_v_in_one_all_to_all_equal_three():
    """gather_heads_many (one exchange) gives every rank what three gather_heads calls give; head counts
    and head dims differ (GQA, MLA-like value dim), the last shard is ragged."""
    gen = torch.Generator().manual_seed(0)
    size, rows, num_tokens = 2, 5, 9
    shapes = [(1, 4, rows, 8), (1, 2, rows, 8), (1, 2, rows, 6)]  # q, k, v
    xs = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(size)]
    many = _simulated_gather("gather_heads_many", xs, num_tokens)
    for r in range(size):
        one_by_one = [_simulated_gather("gather_heads", [[x[i]] for x in xs], num_tokens)[r][0] for i in range(3)]
        got, calls = many[r]
        assert calls == 1
        assert all(torch.equal(a, b) for a, b in zip(got, one_by_one, strict=True))
