"""Tests for ds_chunkflow/data/chat_labels.py: assistant-only labels for the released chat templates (pure CPU).

The templates (ds_chunkflow/testing/chat_templates.py) are the released Qwen2.5, Llama-3, Mistral v0.3,
Gemma and Gemma-3 ones, with a local BPE carrying each family's special tokens.
"""

from __future__ import annotations

import pytest

from ds_chunkflow.constants import IGNORE_INDEX
from ds_chunkflow.data.chat_labels import ChatLabeler, ChatLabelError
from ds_chunkflow.testing.chat_templates import FAMILIES, QWEN2_5
from ds_chunkflow.testing.tokenizer import CHAT_TEMPLATE, build_tokenizer

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


@pytest.fixture(scope="module", params=sorted(FAMILIES))
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


QWEN3_LIKE = QWEN2_5.replace(
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
    "{%- set c = message.content %}{%- if message.role == 'assistant' and not loop.last %}"
    "{%- set c = c.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + c + '<|im_end|>' + '\\n' }}")


def test_template_that_drops_earlier_reasoning_is_refused_saying_why() -> None:
    """A Qwen3-style template that drops earlier turns' <think> reasoning cannot get exact labels: refused
    with a message naming the cause; the same template on chats without reasoning labels fine."""
    assert QWEN3_LIKE != QWEN2_5
    tok = build_tokenizer(chat_template=QWEN3_LIKE)
    with pytest.raises(ChatLabelError, match="Qwen3-style templates drop earlier turns' <think>"):
        ChatLabeler(tok).encode(chat(["<think>hmm</think>One.", "Two."]))
    ids, labels = ChatLabeler(tok).encode(chat(["One.", "Two."]))
    assert runs(tok, ids, labels) == ["One.<|im_end|>", "Two.<|im_end|>"]


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
