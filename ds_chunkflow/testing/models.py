"""Tiny randomly initialised transformers models, for tests, examples and benchmarks.

No weights can be downloaded here, so every model is built from a config with random
init, saved with ``save_pretrained`` and loaded back with ``from_pretrained``, which is
the loading path real checkpoints take.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "mistral")


def tiny_config(family: str, vocab_size: int = 128, hidden_size: int = 64, num_layers: int = 2, **overrides):
    """A small config of a real architecture (GQA: 4 query heads over 2 KV heads)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if family not in classes:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1 << 17, tie_word_embeddings=False)
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return classes[family](**kwargs)


def build_tiny_model(family: str = "qwen2", save_dir: str | Path | None = None, dtype=torch.float32, seed: int = 0,
                     **config_overrides):
    """Random-init model; when ``save_dir`` is given, saved there and loaded back."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_overrides), dtype=dtype)
    if save_dir is None:
        return model
    model.save_pretrained(save_dir)
    return AutoModelForCausalLM.from_pretrained(save_dir, dtype=dtype)
