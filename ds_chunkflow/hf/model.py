"""What a transformers causal LM does after its decoder, so the loss can run without full logits.

A ``*ForCausalLM.forward`` is ``base_model -> final hidden -> lm_head -> extras -> logits``.
ChunkFlow never lets it compute the logits of a whole chunk (at vocab 151,936 an 8K-token
chunk has 4.6 GiB of fp32 logits, and cross-entropy saves as much again): the forward is
called with ``logits_to_keep=1``, the final hidden states are taken from the base model's
output by a forward hook (:func:`final_hidden`), and :class:`OutputHead` maps pieces of
them to logits as the model's forward would, calling the model's own ``lm_head`` module (so
ZeRO-3 gathers its weight, tied or not).

The extras (:data:`FORWARD_EXTRAS`, read from the transformers 5.24 sources)::

    embedding multiplier     Granite      hidden = embed(ids) * embedding_multiplier
    logit scaling            Granite      logits = head(h) / logits_scaling
                             Cohere       logits = head(h) * logit_scale
    final logit softcapping  Gemma 2 / 3, RecurrentGemma  logits = tanh(logits / c) * c

(the embedding multiplier matters only to the pipeline wrapper, which rebuilds the forward.)
A model whose forward does anything else after its decoder is caught by the guard's probe,
which computes its logits through this same path and compares them with the model's own
forward (:mod:`ds_chunkflow.hf.guard`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ForwardExtras:
    """What a model's forward does around its layers, besides embedding, norm and head."""

    embedding_multiplier: float = 1.0  # hidden = embed(ids) * m
    logits_scaling: float = 1.0  # logits = logits / s (Granite's name)
    logit_scale: float = 1.0  # logits = logits * s (Cohere's name)
    final_logit_softcapping: float | None = None  # logits = tanh(logits / c) * c

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.logits_scaling != 1.0:
            logits = logits / self.logits_scaling
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.final_logit_softcapping is not None:
            logits = torch.tanh(logits / self.final_logit_softcapping) * self.final_logit_softcapping
        return logits


def _granite(config) -> ForwardExtras:
    return ForwardExtras(embedding_multiplier=config.embedding_multiplier, logits_scaling=config.logits_scaling)


def _cohere(config) -> ForwardExtras:
    return ForwardExtras(logit_scale=config.logit_scale)


def _gemma(config) -> ForwardExtras:
    return ForwardExtras(final_logit_softcapping=config.final_logit_softcapping)


# model_type -> its forward's extras (transformers 5.24 ``*Model.forward`` / ``*ForCausalLM.forward``)
FORWARD_EXTRAS: dict[str, Callable[..., ForwardExtras]] = {
    "granite": _granite, "granitemoe": _granite, "granitemoeshared": _granite, "granitemoehybrid": _granite,
    "cohere": _cohere, "cohere2": _cohere,
    "gemma2": _gemma, "gemma3_text": _gemma, "vaultgemma": _gemma,
    "recurrent_gemma": lambda config: ForwardExtras(final_logit_softcapping=config.logits_soft_cap),
}


def forward_extras(config) -> ForwardExtras:
    make = FORWARD_EXTRAS.get(config.model_type)
    return make(config) if make is not None else ForwardExtras()


def is_peft_model(model: nn.Module) -> bool:
    """``model`` is a ``peft.PeftModel`` (checked by class, without importing peft)."""
    return any(c.__module__.startswith("peft.") and c.__name__ == "PeftModel" for c in type(model).__mro__)


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``peft.PeftModel`` (``PeftModel.base_model`` is PEFT's tuner, not
    the decoder); ``model`` itself for anything else. Its forward runs through the wrapper all the same."""
    return model.get_base_model() if is_peft_model(model) else model


class OutputHead:
    """Final hidden states ``[..., H]`` -> logits ``[..., V]``, as the model's forward computes them."""

    def __init__(self, model: nn.Module):
        model = base_model_of(model)
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None:
            raise NotImplementedError(f"{type(model).__name__} has no output embedding (lm_head); ChunkFlow trains "
                                      "causal LMs with one")
        self.extras = forward_extras(model.config.get_text_config())
        from ds_chunkflow.deepspeed.deepspeed_adapter import checkpoint_determinism

        self.determinism_check = checkpoint_determinism(self.lm_head)  # for head_loss's checkpoints

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.extras.logits(self.lm_head(hidden))


def _base_model(model: nn.Module) -> nn.Module:
    model = base_model_of(model)
    base = getattr(model, "base_model", model)
    if base is model:
        raise NotImplementedError(f"{type(model).__name__}: no base model under the LM head (base_model_prefix); "
                                  "ChunkFlow needs the decoder's final hidden states")
    return base


@contextlib.contextmanager
def final_hidden(model: nn.Module):
    """Inside the block, ``holder[0]`` is the last forward's final hidden states (the base model's output)."""
    holder: list[torch.Tensor | None] = [None]

    def hook(_module, _args, output):
        holder[0] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = _base_model(model).register_forward_hook(hook)
    try:
        yield holder
    finally:
        handle.remove()


def enable_recompute(module: nn.Module, setting: str | int) -> int:
    """Activation checkpointing inside a chunk: ``"all"`` decoder layers or every N-th; returns how many.

    The same switch as transformers' ``gradient_checkpointing_enable(every_n_layers=N)`` (non-reentrant
    ``torch.utils.checkpoint`` on each ``GradientCheckpointingLayer``), applied to whatever holds the
    layers: the model, or the pipeline stage's wrappers of them. A layer only checkpoints in training mode.
    """
    from functools import partial

    from ds_chunkflow.deepspeed.deepspeed_adapter import checkpoint_determinism
    from ds_chunkflow.hf.transformers_adapter import gradient_checkpointing_layer

    if setting == "none":
        return 0
    every = 1 if setting == "all" else int(setting)
    layers = [m for m in module.modules() if isinstance(m, gradient_checkpointing_layer())]
    if not layers:
        raise NotImplementedError(f"chunkflow.recompute_layers: {type(module).__name__} has no transformers "
                                  "GradientCheckpointingLayer to checkpoint; set recompute_layers: none")
    for i, layer in enumerate(layers):
        layer._gradient_checkpointing_func = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False,
                                                     determinism_check=checkpoint_determinism(layer))
        layer.gradient_checkpointing = i % every == 0
    return sum(layer.gradient_checkpointing for layer in layers)
