"""Assistant-only labels for any chat template, found by rendering and checked per sample.

A chat is rendered once by the tokenizer's own template and tokenised once (so the ids are
exactly ``apply_chat_template(..., tokenize=True)``'s). Labels go on each assistant reply and
on the end-of-turn token the template emits right after it, nothing else::

    render  <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n
    labels  --------------------------------------------------------Hello<|im_end|>--

Where each reply lies, in characters of the full render ``F``:

* templates with ``{% generation %}`` markers: the spans the markers record;
* any other template (the released Qwen2.5, Llama-3, Mistral, Gemma ones): the chat is rendered a
  second time with every assistant ``content`` replaced by a unique sentinel ``S_k``. That render
  is ``P_0 S_0 P_1 S_1 ... S_n P_n+1``: ``P_k`` is everything the template writes between two
  replies (headers, user turns, end tokens). The full render must then be
  ``P_0 R_0 P_1 R_1 ... R_n P_n+1`` where each ``R_k`` is the reply as the template writes it:
  its content, or the content with leading and/or trailing whitespace stripped (Llama-3,
  Mistral and Gemma ``| trim`` it; Qwen2.5 keeps it). The walk tries those (at most four)
  candidates left to right and backtracks, so ``R_k`` is known exactly, as a literal piece of ``F``.
  Because ``P_k`` comes from a render of the *same* conversation, templates that render earlier
  turns differently inside a longer conversation (Mistral v0.3 moves the system prompt to the last
  user turn, so a training render has none) are labelled for the full render; prefix renders
  are never used (for locating replies; see "prefix-stable" below for the one prefix check).

End-of-turn token: the added/special token that ``P_k+1`` starts with (longest match among
``tokenizer.added_tokens_encoder``): ``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ``<end_of_turn>``.
The text after it (Qwen's and Gemma's newline, the next header) is not labelled. A template
that writes no special token right after a reply is refused (nothing would teach the model to
stop). With markers, the marked span must be a reply candidate, optionally followed by one
special token.

Characters -> tokens: the first labelled token is the one holding the reply's first character,
the last one is the end-of-turn token. A token that starts before the reply may only add
whitespace (``" Hello"`` after Mistral's ``[/INST]`` is one byte-level token); a token crossing
into non-whitespace template text is refused.

Check (every sample): each labelled run decodes to its render text, that text is optional
whitespace + ``R_k`` + end token (edge whitespace aside, for decoders such as SentencePiece's
that drop a leading space), runs are in order and disjoint, and there is one per trained
assistant turn; so the labelled text covers each reply and nothing outside it. Any failure is a
:class:`ChatLabelError` (the loaders turn it into a ``DataError`` naming file and line).

Prefix-stable: a trained turn ``k`` (assistant ``messages[i]``) is written in the full render as the
model writes it at inference, i.e. as the template writes it when it is the *final* turn. With
``G_k = render(messages[:i], add_generation_prompt=True)`` and ``F_k = render(messages[:i+1])``,
the text the model generates is ``F_k[len(G_k):]``; the turn is stable when that text, leading
whitespace aside, starts with ``R_k`` + end token as the full render writes them (or when ``F_k``
does not start with ``G_k``: the context moves, as Mistral's system prompt does, not the reply).
Reasoning templates are not stable: Qwen3 writes the final turn as
``<think>\\n{reasoning}\\n</think>\\n\\n{content}`` (an empty think block without reasoning) and
earlier turns as ``{content}`` alone::

    turn 1 in the full render    <|im_start|>assistant\\nOne.<|im_end|>
    turn 1 when final (after G)  <|im_start|>assistant\\n<think>\\nr1\\n</think>\\n\\nOne.<|im_end|>
                                                        ^ labelled from here through <|im_end|>

A conversation with an unstable trained turn (or whose replies the walk cannot find) is labelled on
the renderings where each turn is final (:meth:`ChatLabeler._final_turn`: ``F_k`` tokenised, labels
on ``F_k[len(G_k):]`` through the end-of-turn token, the reasoning block included, checked as
above). With ``assistant_turns="last"``, or one assistant turn, that is one sample (the render of
``messages[:i+1]``; messages after the last reply carry no loss and are not in it). With ``"all"``
and several turns it is one sample per assistant turn (``non_prefix_stable="expand"``, the default)
or a ``not_prefix_stable`` error (``"error"``). Stable conversations (every stock template above,
and Qwen3-style chats whose turns all render alike) keep the single full-render sample. A
different *context* with the same reply (Mistral's moved system prompt) is not instability: the
reply is labelled on the full render. Templates with ``{% generation %}`` markers are labelled by
their markers only.

``assistant_turns``: ``"all"`` (default) labels every assistant reply, ``"last"`` only the final
one (TRL's / axolotl's "last turn only"). Assistant messages with ``tool_calls`` are refused
(their labels would have to cover the call the template writes). Needs a fast tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from ds_chunkflow.constants import IGNORE_INDEX
from ds_chunkflow.hf.transformers_adapter import render_jinja_template

AssistantTurns = Literal["all", "last"]
NonPrefixStable = Literal["expand", "error"]
GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
CHAT_TEMPLATE_REASON = "chat_template"  # a chat the template cannot label exactly (a DataError reason)
NOT_PREFIX_STABLE_REASON = "not_prefix_stable"  # would need one sample per turn, non_prefix_stable="error"
_SENTINEL_BASE = 0xF0000  # plane-15 private-use code points: no template trims, cases or emits them


def _sentinel(k: int) -> str:
    return "\ue000" + chr(_SENTINEL_BASE + k) + "\ue001"


class ChatLabelError(ValueError):
    """One chat's labels cannot be made exact; ``reason`` is a ``LoadStats.skipped`` key."""

    def __init__(self, problem: str, reason: str = CHAT_TEMPLATE_REASON) -> None:
        super().__init__(problem)
        self.reason, self.problem = reason, problem


def _candidates(content: str) -> list[str]:
    """The ways a template may write a reply: as is, or with edge whitespace stripped."""
    out: list[str] = []
    for c in (content, content.strip(), content.lstrip(), content.rstrip()):
        if c not in out:
            out.append(c)
    return out


def _walk(full: str, parts: list[str], contents: list[str]) -> list[tuple[int, str]] | None:
    """``full == parts[0] R_0 parts[1] ... R_n parts[n+1]``: each reply's (start, R_k), or None."""
    if not full.startswith(parts[0]):
        return None
    found: list[tuple[int, str]] = []

    def go(k: int, pos: int) -> bool:
        if k == len(contents):
            return pos == len(full)
        after = parts[k + 1]
        for r in _candidates(contents[k]):
            if full.startswith(r, pos) and full.startswith(after, pos + len(r)):
                found.append((pos, r))
                if go(k + 1, pos + len(r) + len(after)):
                    return True
                found.pop()
        return False

    return found if go(0, len(parts[0])) else None


class ChatLabeler:
    """Renders, tokenises and labels chats with ``tokenizer``'s chat template (module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, assistant_turns: AssistantTurns = "all",
                 non_prefix_stable: NonPrefixStable = "expand") -> None:
        if assistant_turns not in ("all", "last"):
            raise ValueError(f"assistant_turns must be 'all' or 'last', got {assistant_turns!r}")
        if non_prefix_stable not in ("expand", "error"):
            raise ValueError(f"non_prefix_stable must be 'expand' or 'error', got {non_prefix_stable!r}")
        self.non_prefix_stable = non_prefix_stable
        if not tokenizer.chat_template or not isinstance(tokenizer.chat_template, str):
            raise ValueError("tokenizer.chat_template is not set (or is a dict of named templates); chat lines need "
                             "one template to render the messages")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; chat labels need character offsets "
                             "(load it with use_fast=True)")
        self.tokenizer, self.assistant_turns = tokenizer, assistant_turns
        self.template = tokenizer.chat_template
        self.markers = bool(GENERATION_TAG.search(self.template))
        self._backend = tokenizer.backend_tokenizer
        self._specials = sorted(tokenizer.added_tokens_encoder, key=len, reverse=True)
        self._special_ids = dict(tokenizer.added_tokens_encoder)
        self._kwargs = dict(tokenizer.special_tokens_map)

    def _render(self, messages: list[dict[str, Any]], prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        try:
            rendered, spans = render_jinja_template(
                conversations=[messages], chat_template=self.template, return_assistant_tokens_mask=self.markers,
                add_generation_prompt=prompt, **self._kwargs)
        except Exception as e:  # jinja2 TemplateError from raise_exception(), or a template bug on this input
            raise ChatLabelError(f"the chat template refused the conversation: {type(e).__name__}: {e}") from None
        return rendered[0], [tuple(s) for s in spans[0]] if self.markers else []

    def _reply_spans(self, messages: list[dict[str, Any]], full: str, marked: list[tuple[int, int]],
                     assistant: list[int]) -> list[tuple[int, int, int]]:
        """(start of R_k, end of R_k, end of its end token) in ``full`` for each assistant message."""
        contents = [messages[i]["content"] for i in assistant]
        out = []
        if self.markers:
            if len(marked) != len(assistant):
                raise ChatLabelError(f"the template's {{% generation %}} markers mark {len(marked)} spans for "
                                     f"{len(assistant)} assistant messages")
            for (a, b), content, i in zip(marked, contents, assistant):
                text = full[a:b]
                r = next((r for r in _candidates(content) if text.startswith(r)
                          and (text == r or text[len(r):] in self._special_ids)), None)
                if r is None:
                    raise ChatLabelError(f"the {{% generation %}} span of messages[{i}] is {text[:60]!r}, not the "
                                         "reply optionally followed by one special token")
                out.append((a, a + len(r), b))
            return out
        masked = [dict(m) for m in messages]
        for k, i in enumerate(assistant):
            masked[i]["content"] = _sentinel(k)
        probe, _ = self._render(masked)
        parts, pos = [], 0
        for k in range(len(assistant)):
            s = _sentinel(k)
            j = probe.find(s, pos)
            if j < 0 or probe.count(s) != 1:
                raise ChatLabelError(f"the chat template does not write assistant messages[{assistant[k]}] exactly "
                                     "once, so its reply cannot be located")
            parts.append(probe[pos:j])
            pos = j + len(s)
        parts.append(probe[pos:])
        found = _walk(full, parts, contents)
        if found is None:
            raise ChatLabelError(
                "the chat template does not write every assistant reply as its content (edge whitespace aside), or "
                "the text around a reply depends on it (e.g. Qwen3-style templates drop earlier turns' <think> "
                "reasoning)")
        for (a, r), k in zip(found, range(len(assistant))):
            after = parts[k + 1]
            end = next((t for t in self._specials if after.startswith(t)), None)
            if end is None:
                raise ChatLabelError(f"the chat template writes {after[:30]!r} right after the reply of "
                                     f"messages[{assistant[k]}], not an end-of-turn token, so nothing would teach the "
                                     "model to stop; add {% generation %} markers to say what to train")
            out.append((a, a + len(r), a + len(r) + len(end)))
        return out

    def encode(self, messages: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, labels)`` (int64) of one chat; :class:`ChatLabelError` if it cannot be one exact sample."""
        samples = self.encode_samples(messages)
        if len(samples) != 1:
            raise ChatLabelError(f"the chat needs {len(samples)} samples (one per assistant turn: the template is not "
                                 "prefix-stable); use encode_samples", NOT_PREFIX_STABLE_REASON)
        return samples[0]

    def encode_samples(self, messages: Sequence[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One chat -> its samples ``[(input_ids, labels)]``: one, or one per assistant turn for a conversation
        the template does not render prefix-stably (module docstring); :class:`ChatLabelError` if not exact."""
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        bad = next((i for i in assistant if messages[i].get("tool_calls")), None)
        if bad is not None:
            raise ChatLabelError(f"messages[{bad}] has tool_calls; assistant tool calls are not supported")
        full, marked = self._render(messages)
        trained = assistant[-1:] if self.assistant_turns == "last" else assistant
        try:
            spans = dict(zip(assistant, self._reply_spans(messages, full, marked, assistant)))
        except ChatLabelError as e:
            if self.markers or not trained:
                raise
            spans, unstable = {}, e
        else:
            unstable = None if self.markers else next(
                (i for i in trained if not self._written_as_final(messages, full, i, spans[i])), None)
        if unstable is None:
            return [self._label(full, [(i, spans[i]) for i in trained])]
        if len(trained) == 1:
            return [self._final_turn(messages[: trained[0] + 1])]
        if self.non_prefix_stable == "error":
            why = unstable if isinstance(unstable, ChatLabelError) else (
                f"assistant messages[{unstable}] is written differently when it is the final turn")
            raise ChatLabelError(
                f"the chat template does not render this conversation prefix-stably ({why}), so its assistant turns "
                "cannot all be trained in one sample as the model writes them at inference (Qwen3-style templates "
                "drop earlier turns' <think> reasoning); non_prefix_stable='expand' (--non_prefix_stable expand) "
                "gives one sample per assistant turn, assistant_turns='last' trains the last turn only",
                NOT_PREFIX_STABLE_REASON)
        return [self._final_turn(messages[: i + 1]) for i in trained]

    def _label(self, full: str, trained: list[tuple[int, tuple[int, int, int]]]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise ``full`` once; labels on each ``(message index, (a, r_end, b))`` span, checked."""
        enc = self._backend.encode(full, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int64)
        labels = np.full_like(ids, IGNORE_INDEX)
        previous_end = 0
        for i, (a, r_end, b) in trained:
            first, last = self._token_range(enc, ids, full, i, a, r_end, b)
            if first < previous_end:
                raise ChatLabelError(f"the labelled tokens of messages[{i}] overlap the previous reply's")
            self._check_run(full, ids[first : last + 1], enc.token_to_chars(first)[0], a, r_end, b, i)
            labels[first : last + 1] = ids[first : last + 1]
            previous_end = last + 1
        return ids, labels

    def _written_as_final(self, messages: list[dict[str, Any]], full: str, i: int, span: tuple[int, int, int]) -> bool:
        """Whether the full render writes assistant ``messages[i]`` (``full[a:b]``) as the template writes it when
        it is the final turn, after the generation prompt (module docstring, "prefix-stable")."""
        try:
            prompt, _ = self._render(messages[:i], prompt=True)
        except ChatLabelError:  # e.g. a template that cannot render an empty conversation: nothing to compare
            return True
        final = full if i == len(messages) - 1 else self._render(messages[: i + 1])[0]
        if not final.startswith(prompt):  # the context moves (Mistral's system prompt), not the reply: as before
            return True
        a, _, b = span
        return final[len(prompt):].lstrip().startswith(full[a:b].lstrip())

    def _final_turn(self, messages: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """The conversation ending in assistant ``messages[i]`` rendered (``F``), labels on what the model writes
        after the generation prompt ``G``: ``F = G + R + end token + rest``; ``rest`` is what the template writes
        after a sentinel reply, ``R`` must end with the reply (its text after ``</think>`` for inline reasoning)."""
        i = len(messages) - 1
        full, _ = self._render(messages)
        prompt, _ = self._render(messages[:i], prompt=True)
        if not full.startswith(prompt):
            raise ChatLabelError(f"the render of the conversation up to messages[{i}] does not start with the render "
                                 "of the conversation before it + the generation prompt, so what the model writes for "
                                 "that turn is not known")
        s = _sentinel(0)
        probe, _ = self._render([*messages[:i], {**messages[i], "content": s}])
        if probe.count(s) != 1 or not probe.startswith(prompt):
            raise ChatLabelError(f"the chat template does not write assistant messages[{i}] exactly once after the "
                                 "generation prompt, so its reply cannot be located")
        after = probe[probe.index(s) + len(s):]
        r_end = len(full) - len(after)
        content = messages[i]["content"]
        reply = full[len(prompt): max(r_end, len(prompt))]
        tail = content.rsplit("</think>", 1)[-1]
        if not full.endswith(after) or r_end < len(prompt) or not any(
                reply.endswith(c) for c in _candidates(content) + _candidates(tail)):
            raise ChatLabelError(f"the chat template does not write the reply of messages[{i}] as its content (edge "
                                 "whitespace and inline <think> reasoning aside), or the text after it depends on it")
        end = next((t for t in self._specials if after.startswith(t)), None)
        if end is None:
            raise ChatLabelError(f"the chat template writes {after[:30]!r} right after the reply of messages[{i}], not "
                                 "an end-of-turn token, so nothing would teach the model to stop")
        return self._label(full, [(i, (len(prompt), r_end, r_end + len(end)))])

    def _token_range(self, enc, ids: np.ndarray, full: str, i: int, a: int, r_end: int, b: int) -> tuple[int, int]:
        """First and last token of reply ``[a, r_end)`` + end token ``[r_end, b)``."""
        if b <= a:
            raise ChatLabelError(f"messages[{i}] has an empty reply and no end-of-turn token: nothing to train")
        first, last = enc.char_to_token(a), enc.char_to_token(b - 1)
        if first is None or last is None:
            raise ChatLabelError(f"the tokenizer maps no token to the reply of messages[{i}] (characters {a}..{b})")
        start = enc.token_to_chars(first)[0]
        if start < a and not full[start:a].isspace():
            raise ChatLabelError(f"a token of messages[{i}] starts in the template text before the reply "
                                 f"({full[start:a]!r} + reply), so the reply's first token is not the reply alone")
        if self.markers and r_end == b:  # a marked span without an end token: the reply's last token ends it
            return first, last
        if tuple(enc.token_to_chars(last)) != (r_end, b) or ids[last] != self._special_ids.get(full[r_end:b]):
            raise ChatLabelError(f"the end-of-turn token {full[r_end:b]!r} after messages[{i}] is not one token")
        return first, last

    def _check_run(self, full: str, run: np.ndarray, start: int, a: int, r_end: int, b: int, i: int) -> None:
        """The labelled run decodes to whitespace + reply + end token, and to the render's characters."""
        text = self._backend.decode(run.tolist(), skip_special_tokens=False)
        expected = full[start:b]
        lead_ok = a == start or expected[: a - start].isspace()
        if not lead_ok or (text != expected and text.strip() != expected.strip()):
            raise ChatLabelError(f"the labelled tokens of messages[{i}] decode to {text[:60]!r}, not the reply + end "
                                 f"token {full[a:b][:60]!r}")
