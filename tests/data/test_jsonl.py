"""Tests for ds_chunkflow/data/jsonl.py (load_jsonl), ds_chunkflow/data/sampler.py and ds_chunkflow/testing/tokenizer.py (pure CPU)."""

from __future__ import annotations

import json
import logging
import random
import statistics
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from ds_chunkflow.constants import IGNORE_INDEX
from ds_chunkflow.data.jsonl import DataError, GlobalBatchSampler, load_jsonl
from ds_chunkflow.testing.chat_templates import QWEN2_5
from ds_chunkflow.testing.tokenizer import CHAT_TEMPLATE, VOCAB_SIZE, build_tokenizer
from tests.data.test_chat_labels import qwen3_chat, reference_turn

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DATA = REPO / "examples" / "data" / "sample_sft.jsonl"

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3, en français?"},
        {"role": "assistant", "content": "Six. 🎉"},
    ]
}
GOOD = json.dumps({"prompt": "Say hi.", "completion": " Hi!"})


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The toy tokenizer, saved and loaded back the way training scripts load it."""
    save_dir = tmp_path_factory.mktemp("toy_tokenizer")
    build_tokenizer(save_dir)
    return AutoTokenizer.from_pretrained(save_dir)


def write(tmp_path: Path, *lines: str | bytes) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


def loss_spans(tokenizer, sample: dict[str, torch.Tensor]) -> list[str]:
    """Decoded text of each maximal run of labels != -100."""
    spans, current = [], []
    for t, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist()):
        if label != IGNORE_INDEX:
            assert label == t
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    return [tokenizer.decode(s) for s in spans]


# --- toy tokenizer -----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=200))
def test_tokenizer_round_trips_any_text(tokenizer, text: str) -> None:
    """decode(encode(text)) == text for every string (byte-level fallback, no <unk>)."""
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_tokenizer_is_small_and_deterministic(tokenizer) -> None:
    """Two builds give the same vocabulary, of at most VOCAB_SIZE entries, with the specials as single ids."""
    fresh = build_tokenizer()
    assert fresh.get_vocab() == tokenizer.get_vocab()
    assert len(tokenizer) <= VOCAB_SIZE
    for tok in ("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer.encode(tok, add_special_tokens=False)) == 1


def test_tokenizer_save_load_round_trip(tokenizer) -> None:
    """A tokenizer loaded with AutoTokenizer encodes, masks and names its specials like the built one; its
    template is the stock Qwen2.5 one, and the marked variant still gives transformers' assistant masks."""
    built = build_tokenizer()
    assert tokenizer.chat_template == built.chat_template == QWEN2_5
    tokenizer, built = build_tokenizer(chat_template=CHAT_TEMPLATE), build_tokenizer(chat_template=CHAT_TEMPLATE)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(tokenizer, name) == getattr(built, name) is not None
    kwargs = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    a = tokenizer.apply_chat_template(CHAT["messages"], **kwargs)
    b = built.apply_chat_template(CHAT["messages"], **kwargs)
    assert a["input_ids"] == b["input_ids"] and a["assistant_masks"] == b["assistant_masks"]


# --- formats and label masks -------------------------------------------------------


def test_chat_loss_only_on_assistant_turns(tokenizer, tmp_path: Path) -> None:
    """Chat lines carry loss exactly on each assistant reply plus its <|im_end|>."""
    ds = load_jsonl(write(tmp_path, json.dumps(CHAT)), tokenizer)
    expected = [m["content"] + "<|im_end|>" for m in CHAT["messages"] if m["role"] == "assistant"]
    assert loss_spans(tokenizer, ds[0]) == expected
    assert ds[0]["input_ids"].dtype == ds[0]["labels"].dtype == torch.long


def test_prompt_completion_loss_only_on_completion_and_eos(tokenizer, tmp_path: Path) -> None:
    """Prompt/completion lines carry loss on the completion and a final EOS, never on the prompt."""
    ds = load_jsonl(write(tmp_path, json.dumps({"prompt": "Q: 2+2=", "completion": " 4"})), tokenizer)
    s = ds[0]
    assert s["input_ids"][-1] == tokenizer.eos_token_id
    assert loss_spans(tokenizer, s) == [" 4<|eos|>"]
    assert tokenizer.decode(s["input_ids"]) == "Q: 2+2= 4<|eos|>"


def test_pretokenised_labels_default_to_input_ids(tokenizer, tmp_path: Path) -> None:
    """Pre-tokenised lines keep given labels and default missing labels to a copy of input_ids."""
    path = write(tmp_path, '{"input_ids": [5, 6, 7]}', '{"input_ids": [5, 6, 7], "labels": [-100, -100, 7]}')
    ds = load_jsonl(path, tokenizer)
    assert ds[0]["labels"].tolist() == [5, 6, 7]
    assert ds[1]["labels"].tolist() == [-100, -100, 7]
    assert ds.lengths == [3, 3] and ds.num_loss_tokens() == 2 + 1


# --- bad input ---------------------------------------------------------------------

BAD_LINES = [
    ('{"messages": [', "malformed_json", "malformed JSON"),
    (b'{"prompt": "\xff", "completion": "x"}', "malformed_json", "malformed JSON"),
    ("[1, 2]", "unknown_shape", "JSON object"),
    ('{"text": "hi"}', "unknown_shape", "'messages', 'prompt', 'input_ids'"),
    ('{"prompt": "a", "completion": "b", "input_ids": [1]}', "unknown_shape", "'prompt' and 'input_ids'"),
    ('{"prompt": "hi"}', "bad_field", "missing field 'completion'"),
    ('{"prompt": 3, "completion": "x"}', "bad_field", "'prompt' must be str"),
    ('{"messages": "hi"}', "bad_field", "'messages' must be list"),
    ('{"messages": [{"role": "user"}]}', "bad_field", "'messages[0].content'"),
    ('{"messages": [{"role": "user", "content": 1}]}', "bad_field", "'messages[0].content' must be str"),
    ('{"input_ids": [1, "a"]}', "bad_field", "'input_ids[1]' must be int"),
    ('{"input_ids": [1, 99999]}', "out_of_vocab", "'input_ids[1]' = 99999 is outside [0, 512)"),
    ('{"input_ids": [1, 2], "labels": [1, 99999]}', "out_of_vocab", "'labels[1]' = 99999 is outside [0, 512)"),
    ('{"input_ids": [1, 2], "labels": [1, -5]}', "bad_field", "'labels[1]' = -5 is outside"),
    ('{"messages": []}', "empty_sample", "'messages' is an empty list"),
    ('{"input_ids": []}', "empty_sample", "'input_ids' is an empty list"),
    ('{"prompt": "a", "completion": ""}', "empty_sample", "'completion' is empty"),
    ('{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}', "no_loss_tokens", "all labels are masked"),
    ('{"input_ids": [5, 6], "labels": [5, -100]}', "no_loss_tokens", "all labels are masked"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no_loss_tokens", "no message with role 'assistant'"),
    ('{"input_ids": [5, 6, 7], "labels": [5, 6]}', "length_mismatch", "'input_ids' (3) and 'labels' (2)"),
]


@pytest.mark.parametrize("line, reason, problem", BAD_LINES, ids=[r + str(i) for i, (_, r, _) in enumerate(BAD_LINES)])
def test_bad_line_raises_naming_file_line_and_problem(tokenizer, tmp_path: Path, line, reason, problem) -> None:
    """Each kind of bad line raises DataError whose message names the file, the 1-based line and the problem."""
    path = write(tmp_path, GOOD, line, GOOD)
    with pytest.raises(DataError) as info:
        load_jsonl(path, tokenizer)
    err = info.value
    assert (err.line, err.reason) == (2, reason)
    assert str(err).startswith(f"{path}:2: ") and problem in str(err)


def test_skip_mode_counts_every_skipped_line(tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With on_error="skip", bad lines are counted by reason, and lines = blank + samples + skipped; logged once."""
    lines = [GOOD, ""] + [line for line, _, _ in BAD_LINES] + [GOOD]
    with caplog.at_level(logging.INFO, logger="ds_chunkflow.data.jsonl"):
        ds = load_jsonl(write(tmp_path, *lines), tokenizer, on_error="skip")
    stats = ds.stats
    assert len(ds) == stats.num_samples == 2 and ds.line_numbers == [1, len(lines)]
    expected: dict[str, int] = {}
    for _, reason, _ in BAD_LINES:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(stats.skipped) == expected
    assert stats.first_skipped_line["malformed_json"] == 3
    assert stats.num_lines == stats.num_blank_lines + stats.num_samples + stats.num_skipped == len(lines)
    records = [r for r in caplog.records if r.name == "ds_chunkflow.data.jsonl"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING and "skipped" in records[0].getMessage()


def test_overlong_raises_by_default_even_when_skipping_errors(tokenizer, tmp_path: Path) -> None:
    """A sample over max_seq_len raises naming both lengths unless on_overlong says otherwise."""
    path = write(tmp_path, '{"input_ids": [1, 2, 3, 4, 5, 6]}')
    with pytest.raises(DataError, match=r"data.jsonl:1: .*6 tokens.*max_seq_len=4") as info:
        load_jsonl(path, tokenizer, max_seq_len=4, on_error="skip")
    assert info.value.reason == "overlong"


def test_overlong_skip_and_truncate_are_counted(tokenizer, tmp_path: Path) -> None:
    """on_overlong="skip" counts the skipped sample; "truncate" keeps its prefix and counts the truncation."""
    path = write(tmp_path, '{"input_ids": [1, 2, 3, 4, 5, 6]}', '{"input_ids": [7, 8, 9]}')
    skipped = load_jsonl(path, tokenizer, max_seq_len=4, on_overlong="skip")
    assert len(skipped) == 1 and skipped.stats.skipped == {"overlong": 1} and skipped.stats.num_truncated == 0
    cut = load_jsonl(path, tokenizer, max_seq_len=4, on_overlong="truncate")
    assert cut[0]["input_ids"].tolist() == [1, 2, 3, 4] and cut.lengths == [4, 3]
    assert cut.stats.num_truncated == 1 and cut.stats.num_skipped == 0


def test_truncation_that_removes_all_loss_is_an_error(tokenizer, tmp_path: Path) -> None:
    """Truncating away every loss token is a no-loss error, not a silently useless sample."""
    path = write(tmp_path, '{"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, -100, -100, 5, 6]}')
    with pytest.raises(DataError, match="after truncation to max_seq_len=4"):
        load_jsonl(path, tokenizer, max_seq_len=4, on_overlong="truncate")


def test_file_without_samples_raises(tokenizer, tmp_path: Path) -> None:
    """A file that yields no sample (here: blank and skipped lines only) raises DataError naming it."""
    path = write(tmp_path, "", "   ", "{oops")
    with pytest.raises(DataError, match="no samples"):
        load_jsonl(path, tokenizer, on_error="skip")


@pytest.mark.parametrize("template", ["stock", "marked"])
def test_chat_labels_same_with_and_without_generation_markers(tmp_path: Path, template) -> None:
    """The stock Qwen2.5 template (no markers, labelled by rendering) and the marked ChatML template give
    loss on exactly each assistant reply plus its <|im_end|>."""
    tok = build_tokenizer(chat_template=None if template == "stock" else CHAT_TEMPLATE)
    ds = load_jsonl(write(tmp_path, json.dumps(CHAT)), tok)
    assert loss_spans(tok, ds[0]) == [m["content"] + "<|im_end|>" for m in CHAT["messages"] if m["role"] == "assistant"]


def test_chat_last_turn_only(tokenizer, tmp_path: Path) -> None:
    """assistant_turns="last" puts loss on the final assistant reply (and its end token) only."""
    ds = load_jsonl(write(tmp_path, json.dumps(CHAT)), tokenizer, assistant_turns="last")
    assert loss_spans(tokenizer, ds[0]) == [CHAT["messages"][-1]["content"] + "<|im_end|>"]


def test_chat_the_template_cannot_label_is_a_line_error(tmp_path: Path) -> None:
    """A template that rewrites replies (here: upper-cases them) is a chat_template DataError naming the line,
    or skipped and counted; never a silent mis-mask."""
    tok = build_tokenizer(chat_template=QWEN2_5.replace("message.content + '<|im_end|>'",
                                                        "message.content | upper + '<|im_end|>'"))
    path = write(tmp_path, GOOD, json.dumps(CHAT))
    with pytest.raises(DataError, match=r"data.jsonl:2: the chat template does not write (every assistant reply|the reply of)"):
        load_jsonl(path, tok)
    assert load_jsonl(path, tok, on_error="skip").stats.skipped == {"chat_template": 1}


def test_reasoning_chats_expand_per_turn_and_are_counted(tmp_path: Path) -> None:
    """Released Qwen3 template: a 4-turn reasoning chat gives one sample per assistant turn, each exactly the
    independent apply_chat_template construction and naming its line; a single-turn chat stays one sample; the
    stats count the expansion, the summary says so, and lines = blank + kept lines + skipped still holds."""
    tok = build_tokenizer(family="qwen3")
    multi, single = qwen3_chat(), qwen3_chat()[1:3]
    path = write(tmp_path, json.dumps({"messages": multi}), "", json.dumps({"messages": single}), GOOD)
    ds = load_jsonl(path, tok)
    turns = [i for i, m in enumerate(multi) if m["role"] == "assistant"]
    expected = [reference_turn(tok, multi, i) for i in turns] + [reference_turn(tok, single, 1)]
    assert [(ds[k]["input_ids"].tolist(), ds[k]["labels"].tolist()) for k in range(5)] == expected
    assert len(ds) == 6 and ds.line_numbers == [1, 1, 1, 1, 3, 4]
    st = ds.stats
    assert (st.num_expanded_lines, st.num_expanded_samples, st.num_samples, st.num_lines) == (1, 4, 6, 4)
    assert st.num_lines == (st.num_blank_lines + st.num_skipped + st.num_samples - st.num_expanded_samples
                            + st.num_expanded_lines)
    assert st.num_loss_tokens == sum(ds.num_loss_tokens([k]) for k in range(6))
    assert "3 lines -> 6 samples (expanded per assistant turn" in st.summary()
    assert "1 chats into 4 samples" in st.summary()
    last = load_jsonl(path, tok, assistant_turns="last")  # one sample per line, the final turn's reasoning trained
    assert len(last) == 3 and last.stats.num_expanded_lines == 0 and "expanded" not in last.stats.summary()
    assert (last[0]["input_ids"].tolist(), last[0]["labels"].tolist()) == reference_turn(tok, multi, turns[-1])


def test_reasoning_chat_without_expansion_or_too_long_is_a_line_error(tmp_path: Path) -> None:
    """non_prefix_stable="error": the multi-turn reasoning chat is a not_prefix_stable DataError naming file and
    line (or skipped and counted); a line is kept or refused whole: one over-long turn sample refuses the line."""
    tok = build_tokenizer(family="qwen3")
    multi = qwen3_chat()
    path = write(tmp_path, GOOD, json.dumps({"messages": multi}))
    with pytest.raises(DataError, match=r"data.jsonl:2: .*non_prefix_stable='expand'") as e:
        load_jsonl(path, tok, non_prefix_stable="error")
    assert e.value.reason == "not_prefix_stable"
    skipped = load_jsonl(path, tok, non_prefix_stable="error", on_error="skip")
    assert len(skipped) == 1 and skipped.stats.skipped == {"not_prefix_stable": 1}
    first_turn = len(reference_turn(tok, multi, 2)[0])
    with pytest.raises(DataError, match=r"data.jsonl:2: sample has \d+ tokens, longer than max_seq_len"):
        load_jsonl(path, tok, max_seq_len=first_turn)
    cut = load_jsonl(path, tok, max_seq_len=first_turn, on_overlong="skip")
    assert len(cut) == 1 and cut.stats.skipped == {"overlong": 1} and cut.stats.num_expanded_lines == 0


# --- the model's vocabulary and max_seq_len, checked at load time ------------------------
# What the example meets: the toy tokenizer saved next to a tiny Qwen2 (512 embedding rows) loads
# back as a Qwen2Tokenizer with an added '<|endoftext|>' at id 512, so len(tokenizer) == 513.


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from ds_chunkflow.testing.models import build_tiny_model

    save_dir = tmp_path_factory.mktemp("tiny_qwen2")
    build_tokenizer(save_dir)
    model = build_tiny_model("qwen2", save_dir=save_dir, vocab_size=VOCAB_SIZE, hidden_size=32, num_layers=1)
    tok = AutoTokenizer.from_pretrained(save_dir)
    vocab = model.get_input_embeddings().weight.shape[0]
    assert (vocab, len(tok), tok.convert_tokens_to_ids("<|endoftext|>")) == (512, 513, 512)  # the premise
    return model, tok, vocab


def _load_error(path: Path, tok, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        load_jsonl(path, tok, **kwargs)
    return info.value


@pytest.mark.parametrize("field", ["input_ids", "labels"])
def test_id_equal_to_vocab_size_is_a_load_error(model_and_tokenizer, tmp_path: Path, field) -> None:
    """A pre-tokenised id == the model's vocab_size (which len(tokenizer) == 513 would accept) is a DataError
    naming file, line and id; the same id embeds with IndexError, which is what the run used to die of."""
    model, tok, vocab = model_and_tokenizer
    ids, labels = [5, 6, 7], [5, 6, 7]
    (ids if field == "input_ids" else labels)[2] = vocab
    path = write(tmp_path, GOOD, json.dumps({"input_ids": ids, "labels": labels}))
    err = _load_error(path, tok, vocab_size=vocab)
    assert (err.line, err.reason) == (2, "out_of_vocab")
    assert str(err).startswith(f"{path}:2: ") and f"'{field}[2]' = {vocab}" in str(err)
    with pytest.raises(IndexError):
        model.get_input_embeddings()(torch.tensor([vocab]))


@pytest.mark.parametrize("shape", ["chat", "prompt"])
def test_text_with_a_special_token_the_model_cannot_embed_is_a_load_error(model_and_tokenizer, tmp_path: Path,
                                                                         shape) -> None:
    """Ordinary text containing '<|endoftext|>' encodes to id 512: a DataError naming file, line, id and token."""
    _, tok, vocab = model_and_tokenizer
    text = "See <|endoftext|> here."
    line = (json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "Ok."}]})
            if shape == "chat" else json.dumps({"prompt": text, "completion": " Ok."}))
    path = write(tmp_path, GOOD, GOOD, line)
    err = _load_error(path, tok, vocab_size=vocab)
    assert (err.line, err.reason) == (3, "out_of_vocab")
    assert str(err).startswith(f"{path}:3: token id 512 ") and "'<|endoftext|>'" in str(err)
    # skip mode: skipped and counted by reason, the good lines kept
    ds = load_jsonl(path, tok, vocab_size=vocab, on_error="skip")
    assert len(ds) == 2 and ds.stats.skipped == {"out_of_vocab": 1} and ds.stats.first_skipped_line["out_of_vocab"] == 3


def test_tokenizer_larger_than_the_model_warns_at_start_then_errors_per_line(
        model_and_tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """len(tokenizer) > vocab_size: one warning naming both sizes and the token the model cannot embed, before
    any line is read; clean data loads; a line producing that token is a line error. Without vocab_size the
    loader cannot know (len(tokenizer) is the bound): this is why the example passes it."""
    _, tok, vocab = model_and_tokenizer
    clean = write(tmp_path, GOOD, json.dumps(CHAT))
    with caplog.at_level(logging.INFO, logger="ds_chunkflow.data.jsonl"):
        ds = load_jsonl(clean, tok, vocab_size=vocab)
    assert len(ds) == 2
    first = [r for r in caplog.records if r.name == "ds_chunkflow.data.jsonl"][0]
    msg = first.getMessage()
    assert first.levelno == logging.WARNING and "513 entries" in msg and "vocab_size=512" in msg
    assert "512: '<|endoftext|>'" in msg
    bad = write(tmp_path, GOOD, json.dumps({"input_ids": [5, 512]}))
    assert _load_error(bad, tok, vocab_size=vocab).line == 2
    assert len(load_jsonl(bad, tok)) == 2  # the bound without vocab_size: len(tokenizer)


def test_overlong_chat_sample_is_a_load_error_naming_the_line(model_and_tokenizer, tmp_path: Path) -> None:
    """With the config's max_seq_len passed, an over-long sample fails at load time with file and line."""
    _, tok, vocab = model_and_tokenizer
    long_chat = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Ok."}]}
    path = write(tmp_path, GOOD, json.dumps(long_chat))
    err = _load_error(path, tok, vocab_size=vocab, max_seq_len=64)
    assert (err.line, err.reason) == (2, "overlong") and str(err).startswith(f"{path}:2: ")
    assert "max_seq_len=64" in str(err)


BAD_ARGS = [
    ({"on_error": "ignore"}, "on_error"),
    ({"on_overlong": "drop"}, "on_overlong"),
    ({"max_seq_len": 0}, "max_seq_len"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"assistant_turns": "first"}, "assistant_turns"),
    ({"non_prefix_stable": "drop"}, "non_prefix_stable"),
]


@pytest.mark.parametrize("kwargs, name", BAD_ARGS)
def test_bad_arguments_name_the_argument(tokenizer, tmp_path: Path, kwargs, name) -> None:
    """An invalid loader argument raises ValueError naming it."""
    with pytest.raises(ValueError, match=name):
        load_jsonl(write(tmp_path, GOOD), tokenizer, **kwargs)


def test_sample_data_is_heavy_tailed(tokenizer) -> None:
    """examples/data/sample_sft.jsonl loads cleanly; most samples are short and a few are very long."""
    ds = load_jsonl(SAMPLE_DATA, tokenizer)
    assert ds.stats.num_skipped == 0 and len(ds) >= 390
    assert statistics.median(ds.lengths) < 300 and max(ds.lengths) > 8000
    assert sum(n < 1000 for n in ds.lengths) / len(ds) > 0.9
    assert all(n > 0 for n in (ds.num_loss_tokens([i]) for i in range(len(ds))))


# --- sampler -----------------------------------------------------------------------

lengths_st = st.lists(st.integers(1, 100), min_size=1, max_size=60)
mode_st = st.one_of(
    st.builds(lambda n: {"batch_size": n}, st.integers(1, 16)),
    st.builds(lambda n: {"token_budget": n}, st.integers(1, 300)),
)


def take_epochs(sampler: GlobalBatchSampler, num_epochs: int) -> list[list[list[int]]]:
    """The batches of the next num_epochs epochs, grouped by the epoch they came from."""
    epochs: list[list[list[int]]] = [[] for _ in range(num_epochs)]
    start = sampler.epoch
    while sampler.epoch < start + num_epochs:
        epoch = sampler.epoch
        epochs[epoch - start].append(next(sampler))
    return epochs


@settings(max_examples=80, deadline=None)
@given(lengths=lengths_st, mode=mode_st, seed=st.integers(0, 2**31))
def test_sampler_sees_every_sample_once_per_epoch(lengths, mode, seed) -> None:
    """Per epoch, the batches are a partition of all sample indices, each one exactly once."""
    for batches in take_epochs(GlobalBatchSampler(lengths, seed=seed, **mode), 3):
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(batches)


@settings(max_examples=80, deadline=None)
@given(lengths=lengths_st, budget=st.integers(1, 300))
def test_sampler_token_budget_holds_except_single_long_samples(lengths, budget) -> None:
    """A token-budget batch fits in the budget unless it is one sample longer than the budget."""
    for batch in take_epochs(GlobalBatchSampler(lengths, token_budget=budget), 2)[1]:
        assert sum(lengths[i] for i in batch) <= budget or len(batch) == 1


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), batch_size=st.integers(1, 16))
def test_sampler_batch_size_is_exact_except_last_of_epoch(n, batch_size) -> None:
    """Every batch_size batch has batch_size samples, except possibly the last of each epoch."""
    for batches in take_epochs(GlobalBatchSampler([1] * n, batch_size=batch_size), 2):
        assert all(len(b) == batch_size for b in batches[:-1]) and 0 < len(batches[-1]) <= batch_size


def test_sampler_packs_greedily_in_order() -> None:
    """A token-budget batch takes samples in order until the next would overflow (module docstring example)."""
    sampler = GlobalBatchSampler([4, 5, 3, 6, 12, 2, 7], token_budget=10, shuffle=False)
    assert sampler.epoch_batches(0) == [[0, 1], [2, 3], [4], [5, 6]]
    assert [next(sampler) for _ in range(5)] == [[0, 1], [2, 3], [4], [5, 6], [0, 1]]


def test_sampler_is_deterministic_by_seed() -> None:
    """Same seed, same batches; another seed or another epoch, another order; shuffle=False is identity."""
    lengths = list(range(1, 51))
    a = GlobalBatchSampler(lengths, batch_size=7, seed=3)
    b = GlobalBatchSampler(lengths, batch_size=7, seed=3)
    assert [next(a) for _ in range(30)] == [next(b) for _ in range(30)]
    assert a.order(0) != GlobalBatchSampler(lengths, batch_size=7, seed=4).order(0)
    assert a.order(0) != a.order(1)
    assert GlobalBatchSampler(lengths, batch_size=7, shuffle=False).order(5) == list(range(50))


def test_sampler_uses_no_global_rng() -> None:
    """Iterating the sampler leaves torch's and Python's global RNG states untouched."""
    torch_state, py_state = torch.random.get_rng_state(), random.getstate()
    sampler = GlobalBatchSampler([3] * 20, token_budget=10)
    [next(sampler) for _ in range(30)]
    assert torch.equal(torch.random.get_rng_state(), torch_state) and random.getstate() == py_state


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_st, mode=mode_st, seed=st.integers(0, 1000), steps=st.integers(0, 100))
def test_sampler_resume_continues_exactly(lengths, mode, seed, steps) -> None:
    """A sampler restored from state_dict (after a JSON round trip) yields the uninterrupted batches."""
    first = GlobalBatchSampler(lengths, seed=seed, **mode)
    reference = GlobalBatchSampler(lengths, seed=seed, **mode)
    for _ in range(steps):
        next(first), next(reference)
    resumed = GlobalBatchSampler(lengths, seed=seed, **mode)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.epoch == reference.epoch
    assert [next(resumed) for _ in range(40)] == [next(reference) for _ in range(40)]


def test_sampler_arguments_are_checked() -> None:
    """Giving both or neither of batch_size/token_budget, or a foreign state, raises ValueError naming the field."""
    for kwargs in ({}, {"batch_size": 2, "token_budget": 10}):
        with pytest.raises(ValueError, match="batch_size.*token_budget"):
            GlobalBatchSampler([1, 2], **kwargs)
    with pytest.raises(ValueError, match=r"lengths\[1\]"):
        GlobalBatchSampler([1, 0], batch_size=1)
    state = GlobalBatchSampler([1, 2], batch_size=1, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        GlobalBatchSampler([1, 2], batch_size=1, seed=2).load_state_dict(state)
