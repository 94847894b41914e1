"""Tests for ds_chunkflow/data/hf_data.py: load_sft_data through Hugging Face datasets (CPU; one 2-rank test)."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import datasets
import numpy as np
import pytest

from ds_chunkflow.data import hf_data
from ds_chunkflow.data.hf_data import load_sft_data
from ds_chunkflow.data.jsonl import DataError, load_jsonl
from ds_chunkflow.data.sampler import GlobalBatchSampler
from ds_chunkflow.testing.spawn import run_ranks
from ds_chunkflow.testing.tokenizer import build_tokenizer
from tests.data.test_chat_labels import qwen3_chat
from tests.data.test_jsonl import BAD_LINES, CHAT, GOOD, write

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DATA = REPO / "examples" / "data" / "sample_sft.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def same_samples(a, b) -> bool:
    return len(a) == len(b) and all(
        (a[i]["input_ids"] == b[i]["input_ids"]).all() and (a[i]["labels"] == b[i]["labels"]).all()
        and a[i]["input_ids"].dtype == b[i]["input_ids"].dtype for i in range(len(a)))


def test_same_samples_and_stats_as_load_jsonl(tokenizer, cache: Path) -> None:
    """On the example data, load_sft_data gives load_jsonl's samples (ids, labels, dtype), lengths and stats."""
    old = load_jsonl(SAMPLE_DATA, tokenizer)
    new = load_sft_data(SAMPLE_DATA, tokenizer, cache_dir=cache)
    assert same_samples(old, new)
    assert list(old.lengths) == new.lengths.tolist() and old.line_numbers == new.line_numbers.tolist()
    assert old.num_loss_tokens() == new.num_loss_tokens() and old.num_loss_tokens([3, 7]) == new.num_loss_tokens([3, 7])
    assert old.stats == new.stats


@pytest.mark.parametrize("line, reason, problem", BAD_LINES, ids=[r + str(i) for i, (_, r, _) in enumerate(BAD_LINES)])
def test_bad_line_error_is_load_jsonls(tokenizer, tmp_path: Path, cache: Path, line, reason, problem) -> None:
    """Each bad line raises the DataError load_jsonl raises: same file, 1-based line, reason and message."""
    path = write(tmp_path, GOOD, "", line, GOOD)  # a blank line first: line numbers count it
    with pytest.raises(DataError) as old:
        load_jsonl(path, tokenizer)
    with pytest.raises(DataError) as new:
        load_sft_data(path, tokenizer, cache_dir=cache)
    assert (new.value.line, new.value.reason, str(new.value)) == (3, reason, str(old.value))


def test_skip_mode_counts_like_load_jsonl(tokenizer, tmp_path: Path, cache: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """With on_error="skip", the stats (lines, blank, skipped by reason, first skipped line) equal load_jsonl's,
    and one summary is logged; switching on_error reuses the cache (it is applied when loading)."""
    path = write(tmp_path, GOOD, "", *[line for line, _, _ in BAD_LINES], GOOD)
    old = load_jsonl(path, tokenizer, on_error="skip")
    with caplog.at_level(logging.INFO, logger="ds_chunkflow.data.hf_data"):
        new = load_sft_data(path, tokenizer, cache_dir=cache, on_error="skip")
    assert new.stats == old.stats and new.stats.num_skipped == len(BAD_LINES) and same_samples(old, new)
    assert new.line_numbers.tolist() == [1, len(BAD_LINES) + 3]
    records = [r for r in caplog.records if r.name == "ds_chunkflow.data.hf_data"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    with pytest.raises(DataError, match=r":3: malformed JSON"):
        load_sft_data(path, tokenizer, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1


def test_overlong_and_truncate_follow_load_jsonl(tokenizer, tmp_path: Path, cache: Path) -> None:
    """max_seq_len / on_overlong: error even when skipping errors, skip counts, truncate keeps the prefix."""
    path = write(tmp_path, '{"input_ids": [1, 2, 3, 4, 5, 6]}', '{"input_ids": [7, 8, 9]}')
    with pytest.raises(DataError, match=r"data.jsonl:1: .*6 tokens.*max_seq_len=4"):
        load_sft_data(path, tokenizer, cache_dir=cache, max_seq_len=4, on_error="skip")
    for mode in ("skip", "truncate"):
        old = load_jsonl(path, tokenizer, max_seq_len=4, on_overlong=mode)
        new = load_sft_data(path, tokenizer, cache_dir=cache, max_seq_len=4, on_overlong=mode)
        assert same_samples(old, new) and old.stats == new.stats


def test_formats_give_the_same_samples(tokenizer, tmp_path: Path, cache: Path) -> None:
    """JSONL, a JSON array, Parquet and a save_to_disk directory of the same records load the same samples;
    a bad record's error names its 1-based record number."""
    records = [json.loads(x) for x in SAMPLE_DATA.read_text().splitlines()[:40]]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "d.json").write_text(json.dumps(records))
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    ref = load_sft_data(jsonl, tokenizer, cache_dir=cache)
    for name in ("d.json", "d.parquet", "saved"):
        got = load_sft_data(tmp_path / name, tokenizer, cache_dir=cache)
        assert same_samples(ref, got) and got.line_numbers.tolist() == list(range(1, 41)), name
    bad = records[:5] + [{"messages": [{"role": "user", "content": "no reply"}]}]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet:6: no message with role 'assistant'"):
        load_sft_data(tmp_path / "bad.parquet", tokenizer, cache_dir=cache)


def test_second_run_loads_from_the_cache(tokenizer, tmp_path: Path, cache: Path, monkeypatch) -> None:
    """A second call with the same file, tokenizer and options does not tokenise (the map function is never
    called) and gives the same samples; changing the file or an option builds a new cache."""
    path = write(tmp_path, GOOD, json.dumps(CHAT))
    first = load_sft_data(path, tokenizer, cache_dir=cache)

    def boom(self, batch, indices):
        raise AssertionError("tokenised again")

    with monkeypatch.context() as m:
        m.setattr(hf_data._EncodeBatch, "__call__", boom)
        again = load_sft_data(path, tokenizer, cache_dir=cache)
        assert same_samples(first, again)
        with pytest.raises(AssertionError, match="tokenised again"):
            load_sft_data(path, tokenizer, cache_dir=cache, assistant_turns="last")
        path.write_text(GOOD + "\n")
        with pytest.raises(AssertionError, match="tokenised again"):
            load_sft_data(path, tokenizer, cache_dir=cache)
    assert len(load_sft_data(path, tokenizer, cache_dir=cache)) == 1


def test_reasoning_chats_expand_like_load_jsonl(tmp_path: Path, cache: Path) -> None:
    """Released Qwen3 template: expanded chats (one sample per assistant turn) give load_jsonl's samples, line
    numbers and stats (expansion counts included), also from a 2-process map whose shards split the file; with
    non_prefix_stable="error" the same DataError (file, line, reason); the option is part of the cache key."""
    tok = build_tokenizer(family="qwen3")
    multi = qwen3_chat()
    lines = [json.dumps({"messages": multi}), GOOD, "", json.dumps({"messages": multi[:5]}), GOOD,
             json.dumps({"messages": multi[:3]})]
    path = write(tmp_path, *lines)
    old = load_jsonl(path, tok)
    assert old.stats.num_expanded_lines == 2 and len(old) == 4 + 1 + 2 + 1 + 1
    for num_proc in (1, 2):
        new = load_sft_data(path, tok, cache_dir=cache / str(num_proc), num_proc=num_proc, batch_size=2)
        assert same_samples(old, new) and new.stats == old.stats, num_proc
        assert new.line_numbers.tolist() == old.line_numbers == [1, 1, 1, 1, 2, 4, 4, 5, 6]
        assert list(old.lengths) == new.lengths.tolist() and old.num_loss_tokens() == new.num_loss_tokens()
    with pytest.raises(DataError) as a:
        load_jsonl(path, tok, non_prefix_stable="error")
    with pytest.raises(DataError) as b:
        load_sft_data(path, tok, cache_dir=cache / "1", non_prefix_stable="error")
    assert (b.value.line, b.value.reason, str(b.value)) == (1, "not_prefix_stable", str(a.value))
    skipped = load_sft_data(path, tok, cache_dir=cache / "1", non_prefix_stable="error", on_error="skip")
    assert skipped.stats == load_jsonl(path, tok, non_prefix_stable="error", on_error="skip").stats
    assert skipped.line_numbers.tolist() == [2, 5, 6] and len(list((cache / "1").iterdir())) == 2


def test_multi_process_map_gives_the_same_samples(tokenizer, cache: Path) -> None:
    """num_proc=2 (two worker processes, two Arrow shards) gives the same samples and order as num_proc=1."""
    one = load_sft_data(SAMPLE_DATA, tokenizer, cache_dir=cache / "a", num_proc=1, batch_size=64)
    two = load_sft_data(SAMPLE_DATA, tokenizer, cache_dir=cache / "b", num_proc=2, batch_size=64)
    assert same_samples(one, two) and one.stats == two.stats


def test_lengths_are_numpy_and_the_sampler_resumes_exactly(tokenizer, cache: Path) -> None:
    """lengths is an int64 array (not a list); a sampler over it, restored from state_dict, yields the batches
    of an uninterrupted one."""
    ds = load_sft_data(SAMPLE_DATA, tokenizer, cache_dir=cache)
    assert isinstance(ds.lengths, np.ndarray) and ds.lengths.dtype == np.int64
    a = GlobalBatchSampler(ds.lengths, token_budget=4096, seed=5)
    ref = GlobalBatchSampler(ds.lengths, token_budget=4096, seed=5)
    for _ in range(23):
        next(a), next(ref)
    resumed = GlobalBatchSampler(ds.lengths, token_budget=4096, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [next(resumed) for _ in range(60)] == [next(ref) for _ in range(60)]
    assert all(isinstance(i, int) for b in ref.epoch_batches(0) for i in b)


def test_data_error_pickles() -> None:
    """A DataError survives pickling (it is sent between ranks and worker processes) with its fields."""
    e = pickle.loads(pickle.dumps(DataError("f.jsonl", 3, "bad_field", "problem")))
    assert (str(e), e.path, e.line, e.reason, e.problem) == ("f.jsonl:3: problem", "f.jsonl", 3, "bad_field", "problem")


def test_bad_arguments_name_the_argument(tokenizer, tmp_path: Path, cache: Path) -> None:
    """Invalid arguments and unsupported files raise naming the argument or the file."""
    path = write(tmp_path, GOOD)
    for kwargs, name in (({"num_proc": 0}, "num_proc"), ({"batch_size": 0}, "batch_size"),
                         ({"assistant_turns": "x"}, "assistant_turns"), ({"non_prefix_stable": "x"}, "non_prefix_stable")):
        with pytest.raises(ValueError, match=name):
            load_sft_data(path, tokenizer, cache_dir=cache, **kwargs)
    (tmp_path / "d.csv").write_text("a\n")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_sft_data(tmp_path / "d.csv", tokenizer, cache_dir=cache)


@pytest.mark.distributed
def test_two_ranks_tokenise_once_and_fail_together(tmp_path: Path) -> None:
    """Under torch.distributed only local rank 0 tokenises, rank 1 memory-maps its cache and gets the same
    samples; with a bad line both ranks raise the same DataError (no hang)."""
    good = tmp_path / "good.jsonl"
    good.write_text(SAMPLE_DATA.read_text()[:20000].rsplit("\n", 1)[0] + "\n")
    out = tmp_path / "out"
    run_ranks(_worker(), str(good), str(tmp_path / "cache"), str(out), timeout=240)
    r0, r1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in range(2))
    assert (r0["built"], r1["built"]) == (True, False)
    assert r0["lengths"] == r1["lengths"] and r0["first"] == r1["first"] and len(r0["lengths"]) > 10
    bad = write(tmp_path, GOOD, '{"prompt": 3, "completion": "x"}')
    run_ranks(_worker(), str(bad), str(tmp_path / "cache"), str(out), timeout=240)
    r0, r1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in range(2))
    assert r0["error"] == r1["error"] and (r0["line"], r0["reason"]) == (2, "bad_field")


def _worker():
    from tests.helpers.data_workers import load_on_ranks

    return load_on_ranks
