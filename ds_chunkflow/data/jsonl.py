"""JSONL SFT data -> token sequences with label masks, and a global-batch sampler.

Input: one JSON object per line (UTF-8). Three shapes, told apart by their keys
(other keys such as ``"id"`` are ignored; two shapes on one line is an error):

* chat            ``{"messages": [{"role": "user", "content": "..."}, ...]}``, rendered by
  the tokenizer's own chat template, any template (stock ones without ``{% generation %}``
  markers too); loss on every assistant reply and the end-of-turn token after it (or on the
  last reply only, ``assistant_turns="last"``), nothing else, checked per sample: see
  :mod:`ds_chunkflow.data.chat_labels`. A chat the template cannot label exactly is a
  ``chat_template`` line error. A chat the template does not render prefix-stably (reasoning
  templates such as Qwen3's, which drop earlier turns' ``<think>`` blocks) becomes one sample per
  assistant turn, each the conversation up to that turn with loss on that turn as the model writes
  it (its reasoning block included): ``non_prefix_stable="expand"``, the default, counted in
  :class:`LoadStats`; ``"error"`` makes such a line a ``not_prefix_stable`` error. With
  ``assistant_turns="last"`` such a chat is one sample (no expansion);
* prompt/completion ``{"prompt": "...", "completion": "..."}``: ``tokenizer(prompt)``
  (with the tokenizer's own special tokens, e.g. a BOS), then the completion encoded on
  its own, then EOS; loss on completion + EOS;
* pre-tokenised   ``{"input_ids": [...], "labels": [...]}``: ``labels`` optional
  (default: a copy of ``input_ids``), same length, each -100 or a valid id.

Output: a sample is ``{"input_ids": LongTensor[L], "labels": LongTensor[L]}`` with HF
semantics: labels are *not* shifted, ``labels[t]`` is the target predicted at ``t - 1``
and -100 means no loss. So ``labels[0]`` is never a target, and a sample's number of
loss tokens is ``(labels[1:] != -100).sum()``::

    prompt "2+2=", completion "4"
    input_ids [ 2  +  2  =  4  <eos>]
    labels    [-- -- -- --  4  <eos>]      (-- = -100)
    targets      at '=' predict 4, at 4 predict <eos>: 2 loss tokens

Guarantees of :func:`load_jsonl`:

* nothing is dropped or truncated silently. Every bad line raises :class:`DataError`
  naming file, 1-based line and problem; ``on_error="skip"`` skips it instead and counts
  it by reason in :class:`LoadStats`. A sample longer than ``max_seq_len`` is governed by
  ``on_overlong`` alone (``"error"`` raises even when ``on_error="skip"``; ``"skip"`` and
  ``"truncate"`` count). Blank lines are skipped and counted. The stats are logged once;
* checks run in this order: JSON, shape, field types (pre-tokenised ids are checked in
  the same pass against ``vocab_size``), empty sample, encoding (text lines), vocabulary,
  lengths, overlong
  (truncate keeps the first ``max_seq_len`` tokens), no loss tokens (a chat without an
  assistant turn fails this one early); so a sample whose loss tokens all lie past
  ``max_seq_len`` is a "no loss" error, never a sample without targets;
* ``num_lines == num_blank_lines + num_samples + num_skipped`` (minus the samples an expanded
  chat adds: ``num_expanded_samples - num_expanded_lines``); a file with no sample raises;
* every id is one the model can embed: ``0 <= id < vocab_size`` in ``input_ids`` and
  ``labels`` (besides -100), whatever the shape, so a bad id is a :class:`DataError`
  naming file, line and id at load time, never an ``IndexError`` in the embedding hours
  into a run. ``vocab_size`` is the model's (rows of its input embedding); without it,
  ``len(tokenizer)``. A tokenizer with more entries than ``vocab_size`` (e.g. a
  checkpoint's added ``<|endoftext|>``) is accepted with a warning at start naming both
  sizes and the tokens the model cannot embed; each line that produces one of them is then
  an ``out_of_vocab`` error (or skipped and counted with ``on_error="skip"``).

Special tokens in text: as in every HF tokenizer, the literal text of a special token
(``<|im_end|>``, ``<|endoftext|>``) inside a message, prompt or completion is encoded as
that special token, not as its characters. The loader does not change this (the chat
template renders its own markup into the same string, so ``split_special_tokens`` would
break the template's tokens too); one the model can embed passes, one it cannot is an
``out_of_vocab`` error naming the token, so the line can be cleaned or skipped.

:func:`load_jsonl` reads into memory in one Python loop (small files, tests);
:func:`ds_chunkflow.data.hf_data.load_sft_data` does the same line by line checks through Hugging Face
``datasets`` (multi-process, cached on disk, memory-mapped, once per node) and is what training uses.
The global-batch sampler lives in :mod:`ds_chunkflow.data.sampler`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from ds_chunkflow.constants import IGNORE_INDEX
from ds_chunkflow.data.chat_labels import (
    CHAT_TEMPLATE_REASON,
    NOT_PREFIX_STABLE_REASON,
    AssistantTurns,
    ChatLabeler,
    ChatLabelError,
    NonPrefixStable,
)
from ds_chunkflow.data.sampler import GlobalBatchSampler, _is_positive_int  # noqa: F401  (GlobalBatchSampler re-exported)
from ds_chunkflow.runtime.batch import num_targets

logger = logging.getLogger(__name__)

# the same vocabulary as the chunkflow config's on_overlong; truncation only here, opt-in and counted
OnError = Literal["error", "skip"]
OnOverlong = Literal["error", "skip", "truncate"]

# Reasons a line is rejected (keys of ``LoadStats.skipped``).
MALFORMED_JSON = "malformed_json"
UNKNOWN_SHAPE = "unknown_shape"
BAD_FIELD = "bad_field"
EMPTY_SAMPLE = "empty_sample"
LENGTH_MISMATCH = "length_mismatch"
OVERLONG = "overlong"
NO_LOSS = "no_loss_tokens"
OUT_OF_VOCAB = "out_of_vocab"  # an id the model cannot embed (>= vocab_size)
CHAT_TEMPLATE = CHAT_TEMPLATE_REASON  # a chat its template cannot label exactly (ds_chunkflow.data.chat_labels)
NOT_PREFIX_STABLE = NOT_PREFIX_STABLE_REASON  # a chat that needs one sample per turn, non_prefix_stable="error"
NO_SAMPLES = "no_samples"  # the whole file: raised, never skipped

_SHAPES = {"messages": "chat", "prompt": "prompt/completion", "input_ids": "pre-tokenised"}


class DataError(ValueError):
    """A bad input line (or file); the message reads ``path:line: problem``."""

    def __init__(self, path: str, line: int | None, reason: str, problem: str) -> None:
        self.path, self.line, self.reason, self.problem = path, line, reason, problem
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # picklable (sent between ranks and worker processes)
        return DataError, (self.path, self.line, self.reason, self.problem)


class _Bad(Exception):
    """Internal: one line's problem, before the loader adds file and line."""

    def __init__(self, reason: str, problem: str) -> None:
        super().__init__(problem)
        self.reason, self.problem = reason, problem


@dataclass
class LoadStats:
    """What :func:`load_jsonl` read, kept and skipped."""

    path: str
    num_lines: int = 0
    """All lines in the file, blank ones included."""
    num_blank_lines: int = 0
    num_samples: int = 0
    num_truncated: int = 0
    """Samples cut to ``max_seq_len`` (``on_overlong="truncate"``); included in num_samples."""
    num_tokens: int = 0
    num_loss_tokens: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    """Skipped lines by reason (``on_error="skip"`` / ``on_overlong="skip"``)."""
    first_skipped_line: dict[str, int] = field(default_factory=dict)
    num_expanded_lines: int = 0
    """Chat lines given one sample per assistant turn (the template does not render them prefix-stably)."""
    num_expanded_samples: int = 0
    """The samples those lines gave (included in num_samples)."""
    """The first skipped line of each reason, to look at."""

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        text = (
            f"{self.path}: {self.num_samples} samples, {self.num_tokens} tokens "
            f"({self.num_loss_tokens} with loss) from {self.num_lines} lines; "
            f"{self.num_blank_lines} blank, {self.num_skipped} skipped, {self.num_truncated} truncated"
        )
        if self.num_expanded_lines:
            kept = self.num_samples - self.num_expanded_samples + self.num_expanded_lines
            text += (f"; {kept} lines -> {self.num_samples} samples (expanded per assistant turn, the chat template "
                     f"not rendering them prefix-stably: {self.num_expanded_lines} chats into "
                     f"{self.num_expanded_samples} samples)")
        if self.skipped:
            text += " [" + ", ".join(
                f"{r}: {n} (first at line {self.first_skipped_line[r]})" for r, n in sorted(self.skipped.items())
            ) + "]"
        return text


class SFTDataset:
    """Tokenised samples in memory: ``ds[i] == {"input_ids": ..., "labels": ...}``."""

    def __init__(
        self,
        samples: Sequence[dict[str, torch.Tensor]],
        stats: LoadStats | None = None,
        line_numbers: Sequence[int] | None = None,
    ) -> None:
        for i, s in enumerate(samples):
            ids, labels = s["input_ids"], s["labels"]
            if ids.dtype != torch.long or labels.dtype != torch.long or ids.dim() != 1 or ids.shape != labels.shape:
                raise ValueError(f"sample {i}: input_ids and labels must be 1-D torch.long of equal length")
        self._samples = [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples]
        self.stats = stats
        self.line_numbers = list(line_numbers) if line_numbers is not None else None
        """1-based source line of each sample, when loaded from a file."""
        self.lengths: list[int] = [int(s["input_ids"].numel()) for s in self._samples]

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return dict(self._samples[index])  # a new dict; the tensors are shared, treat them as read-only

    def num_loss_tokens(self, indices: Iterable[int] | None = None) -> int:
        """Loss tokens (targets) over ``indices`` (default: all samples)."""
        indices = range(len(self)) if indices is None else indices
        return sum(num_targets(self._samples[i]["labels"]) for i in indices)


def _require(obj: dict[str, Any], key: str, kind: type, what: str) -> Any:
    if key not in obj:
        raise _Bad(BAD_FIELD, f"missing field '{what}'")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _Bad(BAD_FIELD, f"field '{what}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _check_ids(values: list[Any], what: str, vocab_size: int, allow_ignore: bool) -> None:
    for j, v in enumerate(values):
        if not isinstance(v, int) or isinstance(v, bool):
            raise _Bad(BAD_FIELD, f"field '{what}[{j}]' must be int, got {type(v).__name__}")
        if v >= vocab_size:
            raise _Bad(OUT_OF_VOCAB, f"field '{what}[{j}]' = {v} is outside [0, {vocab_size}): "
                                     f"the model's vocab_size is {vocab_size}")
        if not (0 <= v < vocab_size or (allow_ignore and v == IGNORE_INDEX)):
            allowed = f"[0, {vocab_size})" + (f" or {IGNORE_INDEX}" if allow_ignore else "")
            raise _Bad(BAD_FIELD, f"field '{what}[{j}]' = {v} is outside {allowed}")


def _encode_chat(obj: dict[str, Any], labeler: ChatLabeler) -> list[tuple[np.ndarray, np.ndarray]]:
    messages = _require(obj, "messages", list, "messages")
    if not messages:
        raise _Bad(EMPTY_SAMPLE, "field 'messages' is an empty list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _Bad(BAD_FIELD, f"field 'messages[{j}]' must be an object, got {type(m).__name__}")
        _require(m, "role", str, f"messages[{j}].role")
        _require(m, "content", str, f"messages[{j}].content")
    if not any(m["role"] == "assistant" for m in messages):
        raise _Bad(NO_LOSS, "no message with role 'assistant' in field 'messages', so no loss tokens")
    try:
        return labeler.encode_samples(messages)
    except ChatLabelError as e:
        raise _Bad(e.reason, e.problem) from None


def _encode_prompt(obj: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    prompt = _require(obj, "prompt", str, "prompt")
    completion = _require(obj, "completion", str, "completion")
    if not completion:
        raise _Bad(EMPTY_SAMPLE, "field 'completion' is empty")
    # Encoded apart so that the loss boundary is exact; a joint encoding could merge
    # the last prompt byte with the first completion byte into one token.
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return np.asarray(p + c, dtype=np.int64), np.asarray([IGNORE_INDEX] * len(p) + c, dtype=np.int64)


def _encode_pretokenised(obj: dict[str, Any], vocab_size: int) -> tuple[list[int], list[int]]:
    ids = _require(obj, "input_ids", list, "input_ids")
    if not ids:
        raise _Bad(EMPTY_SAMPLE, "field 'input_ids' is an empty list")
    _check_ids(ids, "input_ids", vocab_size, allow_ignore=False)
    if "labels" not in obj:
        return np.asarray(ids, dtype=np.int64), np.asarray(ids, dtype=np.int64)
    labels = _require(obj, "labels", list, "labels")
    _check_ids(labels, "labels", vocab_size, allow_ignore=True)
    if len(labels) != len(ids):
        raise _Bad(LENGTH_MISMATCH, f"fields 'input_ids' ({len(ids)}) and 'labels' ({len(labels)}) differ in length")
    return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def _check_encoded(ids: np.ndarray, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Ids from the tokenizer (chat, prompt/completion) the model cannot embed: ``_Bad(OUT_OF_VOCAB)``."""
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))  # vectorised; the first bad id is reported
    if not len(bad):
        return
    j = int(bad[0])
    v = int(ids[j])
    token = tokenizer.convert_ids_to_tokens(v) if 0 <= v < len(tokenizer) else None
    special = token in set(tokenizer.all_special_tokens) or v in tokenizer.added_tokens_decoder
    what = f"the tokenizer's special token {token!r}" if special else f"token {token!r}"
    raise _Bad(OUT_OF_VOCAB, (
        f"token id {v} at input_ids[{j}] is outside [0, {vocab_size}): the text encodes to {what}, "
        f"which the model cannot embed (model vocab_size {vocab_size}, tokenizer {len(tokenizer)} entries)"
        + ("; the literal text of a special token in the data is encoded as that token" if special else "")
    ))


def _tokenizer_excess(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> str:
    """The tokenizer's entries at ids >= vocab_size, for messages."""
    ids = list(range(vocab_size, len(tokenizer)))
    shown = ", ".join(f"{i}: {tokenizer.convert_ids_to_tokens(i)!r}" for i in ids[:8])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, shape: str, vocab_size: int) -> None:
    """Tokenizer problems are not line problems: raise ValueError whatever ``on_error`` says."""
    if shape == "prompt/completion" and tokenizer.eos_token_id is None:
        raise ValueError("tokenizer.eos_token is not set; prompt/completion lines need it to end the completion")
    if shape == "prompt/completion" and tokenizer.eos_token_id >= vocab_size:
        raise ValueError(f"tokenizer.eos_token {tokenizer.eos_token!r} has id {tokenizer.eos_token_id}, which the "
                         f"model cannot embed (vocab_size {vocab_size}); every prompt/completion line ends with it")


def parse_json_line(raw: bytes) -> dict[str, Any]:
    """One JSONL line -> its object (``_Bad`` if it is not JSON or not an object)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Bad(MALFORMED_JSON, f"malformed JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _Bad(UNKNOWN_SHAPE, f"expected a JSON object, got {type(obj).__name__}")
    return obj


class LineEncoder:
    """One line's object -> its samples ``[(input_ids, labels, truncated)]`` (several for an expanded chat), or
    ``_Bad``: every check of the module docstring, in its order; a line is kept or refused whole (one bad
    sample of an expanded chat refuses the line). Shared by :func:`load_jsonl` and
    :func:`ds_chunkflow.data.hf_data.load_sft_data`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, max_seq_len: int | None,
                 on_overlong: OnOverlong, assistant_turns: AssistantTurns = "all",
                 non_prefix_stable: NonPrefixStable = "expand") -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.max_seq_len, self.on_overlong, self.assistant_turns = max_seq_len, on_overlong, assistant_turns
        self.non_prefix_stable = non_prefix_stable
        self._checked: set[str] = set()
        self._labeler: ChatLabeler | None = None

    def __call__(self, obj: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray, bool]]:
        keys = [k for k in _SHAPES if k in obj]
        if len(keys) != 1:
            found = "none" if not keys else " and ".join(f"'{k}'" for k in keys)
            raise _Bad(UNKNOWN_SHAPE,
                       f"need exactly one of the fields 'messages', 'prompt', 'input_ids'; found {found}")
        shape = _SHAPES[keys[0]]
        if shape not in self._checked:
            _check_tokenizer(self.tokenizer, shape, self.vocab_size)
            if shape == "chat":
                # ValueError: a tokenizer problem
                self._labeler = ChatLabeler(self.tokenizer, self.assistant_turns, self.non_prefix_stable)
            self._checked.add(shape)
        if shape == "pre-tokenised":
            samples = [_encode_pretokenised(obj, self.vocab_size)]
        else:
            samples = _encode_chat(obj, self._labeler) if shape == "chat" else [_encode_prompt(obj, self.tokenizer)]
            for ids, _ in samples:
                _check_encoded(ids, self.tokenizer, self.vocab_size)  # labels are ids or -100
        return [_fit(ids, labels, self.max_seq_len, self.on_overlong) for ids, labels in samples]


def _fit(
    ids: np.ndarray, labels: np.ndarray, max_seq_len: int | None, on_overlong: OnOverlong
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Apply ``max_seq_len`` (raises ``_Bad(OVERLONG)`` unless truncating), then the no-loss check."""
    truncated = max_seq_len is not None and len(ids) > max_seq_len
    if truncated:
        if on_overlong != "truncate":
            raise _Bad(OVERLONG, f"sample has {len(ids)} tokens, longer than max_seq_len={max_seq_len}")
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if not (labels[1:] != IGNORE_INDEX).any():  # labels[0] is never a target
        cut = f" after truncation to max_seq_len={max_seq_len}" if truncated else ""
        raise _Bad(NO_LOSS, f"all labels are masked{cut} (no loss tokens)")
    return ids, labels, truncated


def check_arguments(name: str, tokenizer: PreTrainedTokenizerBase, on_error: str, on_overlong: str,
                    max_seq_len: int | None, vocab_size: int | None, assistant_turns: str = "all",
                    non_prefix_stable: str = "expand") -> int:
    """Validate a loader's arguments (ValueError naming the argument); the vocab_size to check ids against."""
    if on_error not in ("error", "skip"):
        raise ValueError(f"on_error must be 'error' or 'skip', got {on_error!r}")
    if on_overlong not in ("error", "skip", "truncate"):
        raise ValueError(f"on_overlong must be 'error', 'skip' or 'truncate', got {on_overlong!r}")
    if assistant_turns not in ("all", "last"):
        raise ValueError(f"assistant_turns must be 'all' or 'last', got {assistant_turns!r}")
    if non_prefix_stable not in ("expand", "error"):
        raise ValueError(f"non_prefix_stable must be 'expand' or 'error', got {non_prefix_stable!r}")
    if max_seq_len is not None and not _is_positive_int(max_seq_len):
        raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len!r}")
    if max_seq_len is None and on_overlong != "error":
        logger.warning("%s: on_overlong=%r has no effect without max_seq_len", name, on_overlong)
    if vocab_size is not None and not _is_positive_int(vocab_size):
        raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
    if vocab_size is None:
        return len(tokenizer)
    if len(tokenizer) > vocab_size:
        logger.warning(
            "%s: the tokenizer has %d entries but the model embeds only vocab_size=%d ids; the model cannot "
            "embed %s. A line that encodes to one of them is an out_of_vocab error (on_error='skip' skips and "
            "counts it)", name, len(tokenizer), vocab_size, _tokenizer_excess(tokenizer, vocab_size))
    return vocab_size


def load_jsonl(
    path: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_len: int | None = None,
    on_error: OnError = "error",
    on_overlong: OnOverlong = "error",
    vocab_size: int | None = None,
    assistant_turns: AssistantTurns = "all",
    non_prefix_stable: NonPrefixStable = "expand",
) -> SFTDataset:
    """Read a JSONL SFT file into memory (see the module docstring for shapes, checks and guarantees).

    ``vocab_size``: ids the model can embed, ``model.get_input_embeddings().weight.shape[0]``
    (under ZeRO-3, where that weight is partitioned, ``model.config.vocab_size``); default
    ``len(tokenizer)``. Pass it: a tokenizer may hold more entries than the model embeds.
    ``assistant_turns``: ``"all"`` assistant replies carry loss, or only the ``"last"``.
    ``non_prefix_stable``: a chat the template does not render prefix-stably (Qwen3 reasoning) becomes
    one sample per assistant turn (``"expand"``, counted in the stats), or is a line error (``"error"``).
    """
    vocab_size = check_arguments("load_jsonl", tokenizer, on_error, on_overlong, max_seq_len, vocab_size,
                                 assistant_turns, non_prefix_stable)
    encode = LineEncoder(tokenizer, vocab_size, max_seq_len, on_overlong, assistant_turns, non_prefix_stable)
    path = os.fspath(path)
    stats = LoadStats(path=path)
    samples: list[dict[str, torch.Tensor]] = []
    line_numbers: list[int] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            stats.num_lines += 1
            if not raw.strip():
                stats.num_blank_lines += 1
                continue
            try:
                encoded = encode(parse_json_line(raw))
            except _Bad as bad:
                policy = on_overlong if bad.reason == OVERLONG else on_error
                if policy == "error":
                    raise DataError(path, lineno, bad.reason, bad.problem) from None
                stats.skipped[bad.reason] += 1
                stats.first_skipped_line.setdefault(bad.reason, lineno)
                logger.debug("%s:%d: skipped: %s", path, lineno, bad.problem)
                continue
            if len(encoded) > 1:
                stats.num_expanded_lines += 1
                stats.num_expanded_samples += len(encoded)
            for ids, labels, truncated in encoded:
                sample = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}  # int64 = torch.long
                samples.append(sample)
                line_numbers.append(lineno)
                stats.num_samples += 1
                stats.num_truncated += truncated
                stats.num_tokens += len(ids)
                stats.num_loss_tokens += num_targets(sample["labels"])

    level = logging.WARNING if stats.num_skipped or stats.num_truncated else logging.INFO
    logger.log(level, "%s", stats.summary())
    if not samples:
        raise DataError(path, None, NO_SAMPLES, f"no samples ({stats.summary()})")
    return SFTDataset(samples, stats, line_numbers)
