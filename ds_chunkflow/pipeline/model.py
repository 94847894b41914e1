"""A transformers causal LM as a DeepSpeed ``PipelineModule``.

    stage 0                    ...               last stage
    [Embed, Layer 0, ...]  ->  [Layer i, ...] -> [..., Layer L-1, NormHead] -> loss_fn

Between stages flows ``(hidden_states, position_ids)``; position ids travel with the
activations because every decoder layer applies RoPE itself. The chunk being run (its
segments and, for a dependent chunk, its K/V state on this stage) is not a tensor: the
pipeline engine puts it in a :class:`ChunkSlot` shared by the stage's layers before each
forward, and the layers pass it to the ``chunkflow`` attention as the model would.

The layers wrap the model's own modules (embedding, decoder layers, norm, head), so the
parameters are the model's; every rank builds the whole model and the PipelineModule keeps
its stage's layers. (For checkpoints too large for one host, build per-stage layers from
``LayerSpec``s instead; not done here.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import ChunkContext


@dataclass
class ChunkSlot:
    """What the stage's layers need for the current call; set by the pipeline engine."""

    ctx: ChunkContext | None = None
    num_loss_tokens: int = 1
    loss_scale: float = 1.0


class EmbedPipe(nn.Module):
    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, inputs):
        input_ids, position_ids = inputs
        return self.embed_tokens(input_ids), position_ids


class DecoderLayerPipe(nn.Module):
    def __init__(self, layer: nn.Module, rotary_emb: nn.Module, slot: ChunkSlot):
        super().__init__()
        self.layer = layer
        self.rotary_emb = rotary_emb
        self.slot = slot

    def forward(self, inputs):
        hidden, position_ids = inputs
        cos_sin = self.rotary_emb(hidden, position_ids)
        out = self.layer(hidden, attention_mask=None, position_ids=position_ids, use_cache=False,
                         position_embeddings=cos_sin, chunkflow=self.slot.ctx)
        return (out[0] if isinstance(out, tuple) else out), position_ids


class NormHeadPipe(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, inputs):
        hidden, _ = inputs
        return self.lm_head(self.norm(hidden))


def chunk_loss(slot: ChunkSlot):
    """``loss_fn(logits, targets)``: summed CE over the chunk's targets / the global count."""

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] != 1:
            raise ValueError(f"chunk_loss expects one chunk per micro-batch (batch 1), got batch {logits.shape[0]}")
        logits = logits[0] if logits.dtype == torch.float64 else logits[0].float()
        ce = F.cross_entropy(logits, targets[0], ignore_index=-100, reduction="sum")
        return ce * (slot.loss_scale / slot.num_loss_tokens)

    return loss_fn


def pipeline_module(model, num_stages: int, partition_method: str = "uniform"):
    """Wraps a Llama/Qwen2/Mistral-style ``*ForCausalLM`` (``model.model.layers``) for pipelining."""
    from deepspeed.pipe import PipelineModule

    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, a) for a in needed) or not hasattr(model, "lm_head"):
        raise NotImplementedError(f"{type(model).__name__}: pipeline mode needs a decoder-only model with "
                                  "model.embed_tokens / layers / norm / rotary_emb and lm_head")
    if model.lm_head.weight is inner.embed_tokens.weight:
        raise NotImplementedError("pipeline mode does not support tied input/output embeddings yet "
                                  "(tie_word_embeddings=True); the two would live on different stages")
    slot = ChunkSlot()
    layers = [EmbedPipe(inner.embed_tokens)]
    layers += [DecoderLayerPipe(layer, inner.rotary_emb, slot) for layer in inner.layers]
    layers.append(NormHeadPipe(inner.norm, model.lm_head))
    module = PipelineModule(layers=layers, num_stages=num_stages, loss_fn=chunk_loss(slot),
                            partition_method=partition_method, dynamic_shape=True)
    module.chunk_slot = slot
    module.hf_config = model.config
    return module
