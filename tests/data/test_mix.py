"""Several data sources with sampling weights (ds_chunkflow/data/mix.py): deterministic, per-epoch, resumable."""

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_chunkflow.data.mix import MixedDataset, load_sft_mix, steps_for_epochs


class _Source:
    """What the mix reads of a dataset: ``lengths``, ``len`` and ``[i]`` (here: the sample's own id)."""

    def __init__(self, name, lengths):
        self.name, self.lengths = name, list(lengths)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return (self.name, i)


@st.composite
def mixes(draw):
    """A mix of 1-4 sources of 1-20 samples (lengths 1-30), with or without weights (zeros allowed, not all),
    a seed and a batch rule (samples or tokens)."""
    n = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 20), min_size=n, max_size=n))
    sources = [(f"s{k}", _Source(f"s{k}", draw(st.lists(st.integers(1, 30), min_size=m, max_size=m))))
               for k, m in enumerate(sizes)]
    weights = draw(st.one_of(st.none(), st.lists(st.integers(0, 5), min_size=n, max_size=n).filter(any)))
    num_samples = draw(st.one_of(st.none(), st.integers(1, 60)))
    rule = draw(st.one_of(st.builds(lambda b: {"batch_size": b}, st.integers(1, 7)),
                          st.builds(lambda t: {"token_budget": t}, st.integers(1, 60))))
    return MixedDataset(sources, weights, num_samples), {**rule, "seed": draw(st.integers(0, 10_000))}


def _take(sampler, n):
    return [next(sampler) for _ in range(n)]


@settings(max_examples=60, deadline=None)
@given(mixes(), st.integers(0, 25), st.integers(1, 12))
def test_order_is_a_pure_function_of_seed_and_position(mix_rule, done, more):
    """Two samplers built alike give the same batches; a fresh sampler loaded with the state after ``done``
    batches gives exactly the batches (and per-source draw counts) of the uninterrupted one from there."""
    mix, rule = mix_rule
    a, b = mix.make_sampler(**rule), mix.make_sampler(**rule)
    assert _take(a, done) == _take(b, done)
    weights = None if mix.weights is None else list(mix.weights)
    resumed = MixedDataset(list(zip(mix.names, mix.datasets)), weights, mix.num_samples).make_sampler(**rule)
    resumed.load_state_dict(a.state_dict())
    assert resumed.epoch == a.epoch and resumed.draws_per_source() == a.draws_per_source()
    assert _take(resumed, more) == _take(a, more)


@settings(max_examples=60, deadline=None)
@given(mixes(), st.integers(1, 4))
def test_each_epoch_draws_each_source_its_share(mix_rule, num_epochs):
    """Every epoch draws exactly ``draws[k]`` samples of source k: its size without weights, else the
    epoch's samples shared by weight to within one (a positive weight at least one draw, weight 0 none);
    the epoch's batches are its order, whole (none dropped, none across epochs)."""
    mix, rule = mix_rule
    sampler = mix.make_sampler(**rule)
    total = int(mix.draws.sum())
    if mix.weights is None and total == len(mix):
        assert mix.draws.tolist() == mix.sizes.tolist()
    elif mix.weights is not None:
        exact = total * mix.weights / mix.weights.sum()
        for k, w in enumerate(mix.weights):
            assert (mix.draws[k] == 0) == (w == 0)
            assert abs(mix.draws[k] - exact[k]) < 1 or mix.draws[k] == 1, (mix.draws, exact)
    for e in range(num_epochs):
        order = sampler.order(e)
        assert Counter(mix.source_of(order).tolist()) == {k: int(d) for k, d in enumerate(mix.draws) if d}
        assert [i for batch in sampler.epoch_batches(e) for i in batch] == order


@settings(max_examples=60, deadline=None)
@given(mixes(), st.integers(1, 5))
def test_a_source_repeats_a_sample_only_after_a_full_pass(mix_rule, num_epochs):
    """Over any number of epochs, the samples of a source are drawn equally often to within one: an
    up-weighted source repeats only after a full pass, a down-weighted one sees every sample before a repeat."""
    mix, rule = mix_rule
    sampler = mix.make_sampler(**rule)
    drawn = np.concatenate([sampler.order(e) for e in range(num_epochs)])
    for k in range(len(mix.names)):
        counts = np.bincount(drawn[mix.source_of(drawn) == k] - mix.offsets[k], minlength=int(mix.sizes[k]))
        assert counts.max() - counts.min() <= 1, (k, counts)


@settings(max_examples=40, deadline=None)
@given(mixes(), st.integers(0, 30))
def test_draws_per_source_count_what_was_yielded(mix_rule, steps):
    """The per-source draw counts (logged as data_drawn_<name>) are the sources of every index yielded so far."""
    mix, rule = mix_rule
    sampler = mix.make_sampler(**rule)
    yielded = [i for batch in _take(sampler, steps) for i in batch]
    got = Counter({mix.names[k]: n for k, n in Counter(mix.source_of(yielded).tolist()).items()})
    assert sampler.draws_per_source() == {name: got[name] for name in mix.names}
    assert sampler.source_metrics() == {f"data_drawn_{n}": float(got[n]) for n in mix.names}


def test_reshuffled_per_epoch_and_by_seed():
    """Each epoch has its own order, and another seed gives another one; the items are dataset entries."""
    mix = MixedDataset({"a": _Source("a", [3] * 10), "b": _Source("b", [5] * 7)}, weights=[1, 1])
    s = mix.make_sampler(batch_size=4, seed=1)
    assert s.order(0) != s.order(1) and s.order(0) != mix.make_sampler(batch_size=4, seed=2).order(0)
    assert mix[int(mix.offsets[1]) + 2] == ("b", 2) and mix[9] == ("a", 9)


def test_epochs_and_steps():
    """The sampler's epoch moves after the epoch's last batch; steps_for_epochs counts the batches."""
    mix = MixedDataset({"a": _Source("a", [3] * 8), "b": _Source("b", [5] * 6)}, weights=[3, 1])
    assert mix.draws.tolist() == [11, 3]  # 14 * 3/4 = 10.5, 14 / 4 = 3.5: the tie goes to the first source
    sampler = mix.make_sampler(batch_size=5)
    assert steps_for_epochs(mix, 2, batch_size=5) == 6
    assert steps_for_epochs(_Source("c", [4] * 7), 3, token_budget=10) == 12  # one source: GlobalBatchSampler
    _take(sampler, 2)
    assert sampler.epoch == 0
    _take(sampler, 1)
    assert sampler.epoch == 1


def test_resume_refuses_other_sources():
    """A sampler state from a run with other sources or weights is refused, naming what differs."""
    a = MixedDataset({"a": _Source("a", [3] * 8), "b": _Source("b", [5] * 6)}, weights=[3, 1]).make_sampler(
        batch_size=5)
    b = MixedDataset({"a": _Source("a", [3] * 8), "b": _Source("b", [5] * 6)}, weights=[1, 1]).make_sampler(
        batch_size=5)
    with pytest.raises(ValueError, match="draws_per_epoch"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("kwargs, match", [
    ({"weights": [1, -1]}, "weights"), ({"weights": [0, 0]}, "weights"), ({"weights": {"c": 1}}, "unknown sources"),
    ({"num_samples": 0}, "num_samples"),
])
def test_bad_mix_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixedDataset({"a": _Source("a", [1]), "b": _Source("b", [2])}, **kwargs)


def test_files_load_each_with_its_cache_and_errors_name_the_file(tmp_path):
    """load_sft_mix reads several files (JSONL and Parquet here), each through load_sft_data into its own
    cache entry; a bad line of the second file is reported with that file and line."""
    import datasets

    from ds_chunkflow.data.jsonl import DataError
    from ds_chunkflow.testing.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    a = tmp_path / "a.jsonl"
    a.write_text("\n".join(json.dumps({"input_ids": list(range(5, 5 + n))}) for n in (4, 6, 3)) + "\n")
    b = tmp_path / "b.parquet"
    datasets.Dataset.from_list([{"input_ids": list(range(7, 7 + n))} for n in (5, 2)]).to_parquet(str(b))
    cache = tmp_path / "cache"
    mix = load_sft_mix([a, b], tokenizer, weights=[1, 1], cache_dir=cache, vocab_size=512)
    assert mix.names == ["a", "b"] and mix.sizes.tolist() == [3, 2] and len(list(cache.iterdir())) == 2
    assert mix[3]["input_ids"].tolist() == list(range(7, 12))
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({"input_ids": [5, 6]}) + "\n{not json\n")
    with pytest.raises(DataError, match=f"^{bad}:2: "):
        load_sft_mix([a, bad], tokenizer, cache_dir=cache, vocab_size=512)


@pytest.mark.distributed
def test_resumed_run_draws_the_uninterrupted_runs_samples(tmp_path):
    """2 ranks, ZeRO-2: a weighted mix of two sources trained 6 steps (two epochs), and the same stopped after 2
    steps, checkpointed and resumed by a fresh engine: the same samples in the same global batches, bitwise the
    same losses, and the logged data_drawn_<source> are the counts of the samples drawn."""
    import torch

    from ds_chunkflow.testing.spawn import run_ranks
    from tests.helpers.data_mix_workers import mix_with_resume

    out = tmp_path / "mix.pt"
    run_ranks(mix_with_resume, str(tmp_path), str(out), 6, 2)
    full, resumed = torch.load(f"{out}.full"), torch.load(f"{out}.resumed")
    assert resumed["batches"] == full["batches"] and resumed["losses"] == full["losses"], (resumed, full)
    assert full["epoch"] == resumed["epoch"] == 2
    drawn = Counter(name for batch in full["batches"] for name, _ in batch)
    assert full["metrics"] == resumed["metrics"] == {"data_drawn_a": drawn["a"], "data_drawn_b": drawn["b"]}
    assert drawn == {"a": 22, "b": 6}, drawn  # two epochs of 11 + 3 draws (weights 3:1 over 8 + 6 samples)
