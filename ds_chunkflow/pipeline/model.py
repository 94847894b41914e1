"""A transformers causal LM as a DeepSpeed ``PipelineModule``.

    stage 0                    ...               last stage
    [Embed, Layer 0, ...]  ->  [Layer i, ...] -> [..., Layer L-1, Norm, Head] -> chunk loss
                                                                       (head + CE in pieces)

Between stages flows ``(hidden_states, position_ids)``; position ids travel with the
activations because every decoder layer applies RoPE itself (with the rotary embedding of
its layer type where the model has one per type, Gemma 3). The chunk being run (its
segments and, for a dependent chunk, its K/V state on this stage) is not a tensor: the
pipeline engine puts it in a :class:`ChunkSlot` shared by the stage's layers before each
forward, and the layers pass it to the ``chunkflow`` attention as the model would.

The layers wrap the model's own modules (embedding, decoder layers, norm, head), so the
parameters are the model's; every rank builds the whole model and the PipelineModule keeps
its stage's layers. (For checkpoints too large for one host, build per-stage layers from
``LayerSpec``s instead; not done here.)

A model's forward is more than its layers. What it does around them, per ``model_type``
(:data:`ds_chunkflow.hf.model.FORWARD_EXTRAS`: embedding multiplier, logit scaling, final
logit softcapping), is reproduced here.

(Gemma's embedding normaliser ``sqrt(hidden_size)`` lives in its embedding module, so the
embedding layer applies it.) Tied input/output embeddings (``tie_word_embeddings``) become a
DeepSpeed ``TiedLayerSpec``: one module holding the embedding and the head on the first and
the last stage, whose weight DeepSpeed broadcasts at init and whose gradient
``ReduceTiedGrads`` sums over both.

Anything else is refused at wrap time, on every rank alike, before any collective:
:func:`ds_chunkflow.hf.guard.check_model` refuses what ChunkFlow itself cannot run exactly, and
a self-check runs the whole list of pipe layers in this process on a probe input and
compares their logits with the model's own forward (:func:`self_check`); a model whose
forward does something the wrapper does not reproduce shows up there as an O(1) difference.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from deepspeed.runtime.pipe.module import TiedLayerSpec
from torch import nn

from ds_chunkflow.deepspeed.distributed import agree_on_errors
from ds_chunkflow.hf.guard import PROBE_TOLERANCE, check_model
from ds_chunkflow.hf.model import ForwardExtras, forward_extras
from ds_chunkflow.ops.attention import use_chunkflow_attention
from ds_chunkflow.ops.context import ChunkContext, SegmentSpec

TIED_KEY = "embed_tokens"
TIED_WEIGHT = "embed.embed_tokens.weight"  # inside TiedEmbeddingPipe
SELF_CHECK_LENGTHS = (12, 9)  # probe sequences, run one at a time


@dataclass
class ChunkSlot:
    """What the stage's layers need for the current call; set by the pipeline engine."""

    ctx: ChunkContext | None = None
    head: "HeadPipe | None" = None  # the model's head (last stage): the loss computes logits through it


# ---------------------------------------------------------------------------- pipe layers
class EmbedPipe(nn.Module):
    """``(input_ids, position_ids)`` -> ``(hidden, position_ids)``."""

    def __init__(self, embed_tokens: nn.Module, multiplier: float = 1.0):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.multiplier = multiplier

    def forward(self, inputs):
        input_ids, position_ids = inputs
        hidden = self.embed_tokens(input_ids)
        return (hidden * self.multiplier if self.multiplier != 1.0 else hidden), position_ids


class DecoderLayerPipe(nn.Module):
    def __init__(self, layer: nn.Module, rotary_emb: nn.Module, slot: ChunkSlot, layer_type: str | None = None):
        super().__init__()
        self.layer = layer
        self.rotary_emb = rotary_emb
        self.slot = slot
        self.layer_type = layer_type  # for a rotary embedding per layer type, else None

    def forward(self, inputs):
        hidden, position_ids = inputs
        rope_args = () if self.layer_type is None else (self.layer_type,)
        cos_sin = self.rotary_emb(hidden, position_ids, *rope_args)
        out = self.layer(hidden, attention_mask=None, position_ids=position_ids, use_cache=False,
                         position_embeddings=cos_sin, chunkflow=self.slot.ctx)
        return (out[0] if isinstance(out, tuple) else out), position_ids


class NormPipe(nn.Module):
    """``(hidden, position_ids)`` -> normalised hidden."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, inputs):
        hidden, _ = inputs
        return self.norm(hidden)


class HeadPipe(nn.Module):
    """The model's head, last layer of the pipe: passes the normalised hidden states on unchanged.

    The logits are computed by the chunk runtime's loss, in pieces of target rows (through
    :meth:`logits`), so no stage ever holds a whole chunk's ``[tokens, vocab]`` logits.
    """

    def __init__(self, lm_head: nn.Module, extras: ForwardExtras):
        super().__init__()
        self.lm_head = lm_head
        self.extras = extras

    def forward(self, hidden):
        return hidden

    def logits(self, hidden):
        return self.extras.logits(self.lm_head(hidden))


class TiedEmbeddingPipe(nn.Module):
    """Embedding and head sharing one weight; the first stage embeds, the last passes hidden to the loss."""

    def __init__(self, embed: EmbedPipe, head: HeadPipe):
        super().__init__()
        self.embed = embed
        self.head = head

    def forward(self, inputs):
        return self.embed(inputs)


def _tied_head(module: TiedEmbeddingPipe, hidden):
    return module.head(hidden)


# ---------------------------------------------------------------------------- wrapping
def _refuse(model, reason: str) -> NotImplementedError:
    return NotImplementedError(f"{type(model).__name__}: pipeline mode {reason}")


def _decoder(model) -> nn.Module:
    """``model.model``, checked for the parts the pipe layers wrap."""
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, a) for a in needed) or not hasattr(model, "lm_head"):
        raise _refuse(model, "needs a decoder-only model with model.embed_tokens / layers / norm / rotary_emb "
                      "and lm_head")
    return inner


def _rope_layer_types(model, inner) -> list[str | None]:
    """Per decoder layer, the layer type its rotary embedding takes, or None when it takes none."""
    params = inspect.signature(inner.rotary_emb.forward).parameters.values()
    required = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                                               p.POSITIONAL_OR_KEYWORD)]
    count = model.config.num_hidden_layers
    if len(required) == 2:
        return [None] * count
    layer_types = getattr(model.config, "layer_types", None)
    if required[2:] == ["layer_type"] and layer_types is not None and len(layer_types) >= count:
        return list(layer_types[:count])
    raise _refuse(model, f"does not know how to call its rotary embedding {type(inner.rotary_emb).__name__}"
                  f"({', '.join(required)})")


def _is_tied(model, inner) -> bool:
    if model.lm_head.weight is not inner.embed_tokens.weight:
        return False
    if len(list(model.lm_head.parameters())) > 1:
        raise _refuse(model, "supports a head tied to the embedding only if the tied weight is its only parameter")
    return True


def pipe_layers(model, slot: ChunkSlot) -> list:
    """The PipelineModule's layer list: modules, and a ``TiedLayerSpec`` at both ends if tied."""
    inner = _decoder(model)
    extras = forward_extras(model.config)
    embed = EmbedPipe(inner.embed_tokens, extras.embedding_multiplier)
    head = HeadPipe(model.lm_head, extras)
    slot.head = head
    layer_types = _rope_layer_types(model, inner)
    decoder = [DecoderLayerPipe(layer, inner.rotary_emb, slot, t) for layer, t in zip(inner.layers, layer_types)]
    first, last = embed, head
    if _is_tied(model, inner):
        first = TiedLayerSpec(TIED_KEY, TiedEmbeddingPipe, embed, head, tied_weight_attr=TIED_WEIGHT)
        last = TiedLayerSpec(TIED_KEY, TiedEmbeddingPipe, embed, head, forward_fn=_tied_head,
                             tied_weight_attr=TIED_WEIGHT)
    return [first, *decoder, NormPipe(inner.norm), last]


def _sequential(layers: list) -> list[Callable]:
    """The layers as callables, the way ``PipelineModule`` builds them, all in this process."""
    tied: dict[str, nn.Module] = {}
    funcs = []
    for layer in layers:
        if isinstance(layer, TiedLayerSpec):
            if layer.key not in tied:
                tied[layer.key] = layer.build()
            module = tied[layer.key]
            funcs.append(module if layer.forward_fn is None else partial(layer.forward_fn, module))
        else:
            funcs.append(layer)
    return funcs


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def self_check(model, layers: list, slot: ChunkSlot) -> float:
    """Runs all pipe layers in order on probe sequences and compares with ``model``'s own logits.

    Eval mode, no grad, one sequence at a time as one chunkflow segment; the reference is the
    model's forward with its stock attention. Returns the worst relative logit error; raises
    NotImplementedError above the guard's ``PROBE_TOLERANCE`` (rounding sits well below it).
    """
    funcs = _sequential(layers)
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for n in SELF_CHECK_LENGTHS:
                ids = torch.randint(0, model.config.vocab_size, (1, n), generator=generator).to(param.device)
                positions = torch.arange(n, device=param.device)[None]
                ref = model(input_ids=ids, position_ids=positions, use_cache=False).logits
                slot.ctx = ChunkContext([SegmentSpec(0, n)])
                out = (ids, positions)
                with use_chunkflow_attention(model.config):
                    for f in funcs:
                        out = f(out)
                worst = max(worst, _relative_error(slot.head.logits(out), ref))
    finally:
        slot.ctx = None
        model.train(was_training)
    tol = PROBE_TOLERANCE.get(param.dtype, 1e-4)
    if not worst <= tol:  # NaN too
        raise _refuse(model, f"would not train it exactly: its pipe layers' logits differ from the model's own "
                      f"forward by {worst:.1e} (relative, tolerance {tol:.0e} for {param.dtype}) on a probe input, "
                      "so the model's forward does something between its layers that the pipeline wrapper does not "
                      "reproduce. Train it without pipeline parallelism, or add what its forward does to "
                      "ds_chunkflow.hf.model.FORWARD_EXTRAS")
    return worst


def _checked_layers(model, slot: ChunkSlot) -> list:
    check_model(model)  # the stages carry K/V and mixer state like data parallelism (ds_chunkflow.runtime.chunk)
    layers = pipe_layers(model, slot)
    self_check(model, layers, slot)
    return layers


def pipeline_module(model, num_stages: int, partition_method: str = "type:DecoderLayerPipe"):
    """Wraps a decoder-only ``*ForCausalLM`` (``model.model.layers``) for pipelining, or refuses it.

    Every rank must call this with the same model. A refusal (``NotImplementedError``, the
    same on every rank, which all hold the same model) is raised before the PipelineModule's
    first collective; should only some ranks fail, the others raise a RuntimeError. The
    default partition gives every stage the same number of decoder layers (embedding, norm
    and head have no attention and cost little).
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.pipe import PipelineModule

    slot = ChunkSlot()
    error, layers = None, None
    try:
        layers = _checked_layers(model, slot)
    except Exception as e:  # re-raised by agree_on_errors, here and (as a RuntimeError) on every other rank
        error = e
    agree_on_errors(error, device=get_accelerator().current_device_name())
    module = PipelineModule(layers=layers, num_stages=num_stages, loss_fn=None,
                            partition_method=partition_method, dynamic_shape=True)
    module.chunk_slot = slot
    module.hf_config = model.config
    module.guard_report = check_model(model)  # cached: the verdict of the wrap-time check above
    return module
