"""Write examples/data/sample_sft.jsonl: ~400 chat samples with a heavy-tailed length mix.

The token lengths (under :mod:`ds_chunkflow.testing.tokenizer`) mimic LMSysChat1M, where most
conversations are short and a few are very long, which is the case ChunkFlow is built for:

    bucket (tokens)   samples   share
    20 - 300            348     ~87%
    300 - 1000           40     ~10%
    2K - 8K              10     ~2.5%
    12K - 16K             2     ~0.5%

Each sample draws a target length from its bucket (log-uniform), then fills an optional
system prompt and 1-4 user/assistant turns with sentences of random words from a fixed
word list until the rendered chat reaches the target. Seeded, so every run writes the
same file. Run from anywhere: ``python examples/make_sample_data.py``.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the package is not installed; run straight from the checkout

from ds_chunkflow.testing.tokenizer import build_tokenizer  # noqa: E402

SEED = 1234
OUT = REPO / "examples" / "data" / "sample_sft.jsonl"
BUCKETS = [((20, 300), 348), ((300, 1000), 40), ((2000, 8000), 10), ((12000, 16000), 2)]
"""((min_tokens, max_tokens), number of samples)."""

WORDS = """
the of and to in is you that it he was for on are as with his they at be this have from or
one had by word but not what all were we when your can said there use an each which she do
how their if will up other about out many then them these so some her would make like him
into time has look two more write go see number no way could people my than first water
been call who oil its now find long down day did get come made may part model data token
chunk batch memory device train loss sequence context answer question small large fast slow
river city house tree light sound music paper story friend school world color food travel
""".split()
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in short sentences.",
    "You are an expert who explains things step by step.",
]


def sentence(rng: random.Random, num_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(num_words)]
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"])


def text_of(rng: random.Random, num_words: int) -> str:
    """Sentences of 4-14 random words, ``num_words`` words in all."""
    out: list[str] = []
    while num_words > 0:
        n = min(num_words, rng.randint(4, 14))
        out.append(sentence(rng, n))
        num_words -= n
    return " ".join(out)


def conversation(rng: random.Random, num_tokens: int, tokens_per_word: float) -> list[dict[str, str]]:
    """A chat of about ``num_tokens`` tokens: ~30% user text, ~70% assistant text."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    num_turns = 1 if rng.random() < 0.7 or num_tokens < 80 else rng.randint(2, 4)
    overhead = 6 * (len(messages) + 2 * num_turns)  # "<|im_start|>role\n ... <|im_end|>\n" per message
    overhead += sum(len(m["content"].split()) * tokens_per_word for m in messages)  # the system prompt
    words_per_turn = max(2, int((num_tokens - overhead) / tokens_per_word / num_turns))
    for _ in range(num_turns):
        user_words = max(1, int(words_per_turn * rng.uniform(0.1, 0.5)))
        messages.append({"role": "user", "content": text_of(rng, user_words)})
        messages.append({"role": "assistant", "content": text_of(rng, max(1, words_per_turn - user_words))})
    return messages


def main() -> None:
    rng = random.Random(SEED)
    tokenizer = build_tokenizer()
    probe = text_of(rng, 2000)  # calibrate: capitals and punctuation cost tokens too
    tokens_per_word = len(tokenizer.encode(probe, add_special_tokens=False)) / 2000

    targets = [
        round(math.exp(rng.uniform(math.log(lo), math.log(hi)))) for (lo, hi), n in BUCKETS for _ in range(n)
    ]
    rng.shuffle(targets)
    lines, lengths = [], []
    for target in targets:
        messages = conversation(rng, target, tokens_per_word)
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
        lengths.append(len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]))

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report(lengths)
    print(f"wrote {len(lines)} samples, {OUT.stat().st_size / 1e6:.2f} MB -> {OUT.relative_to(REPO)}")


def report(lengths: list[int]) -> None:
    s = sorted(lengths)
    pct = {p: s[min(len(s) - 1, int(p / 100 * len(s)))] for p in (50, 87.5, 90, 99)}
    print("tokens: " + "  ".join(f"p{p:g}={v}" for p, v in pct.items()) + f"  max={s[-1]}  total={sum(s)}")
    edges = [0, 300, 1000, 2000, 8000, 12000, 10**9]
    for lo, hi in zip(edges, edges[1:]):
        n = sum(lo <= x < hi for x in s)
        print(f"  [{lo:>6}, {hi if hi < 10**9 else 'inf':>6})  {n:4d}  {'#' * math.ceil(60 * n / len(s))}")


if __name__ == "__main__":
    main()
