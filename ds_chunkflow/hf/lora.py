"""LoRA through chunked training: a ``peft`` model is a model like any other to ChunkFlow.

A ``PeftModel`` wraps the transformers model (``PeftModel -> LoraModel -> *ForCausalLM``) and
replaces each targeted ``nn.Linear`` by a ``lora.Linear`` that adds ``B(A(dropout(x))) * alpha / r``
to the frozen base layer's output. Nothing in that sum mixes tokens, so the chunked forward and
backward stay exact; what ChunkFlow has to know is where the real model is, because the wrapper
declares no attention interface and its ``base_model`` is PEFT's tuner, not the decoder
(:func:`ds_chunkflow.hf.model.base_model_of`, used by the guard and the loss head)::

    PeftModel(ForCausalLM)          forward(**kwargs) -> LoraModel -> Qwen2ForCausalLM(**kwargs)
      .base_model   LoraModel       (not the decoder: ChunkFlow hooks the inner model's decoder)
        .model      Qwen2ForCausalLM   <- base_model_of(peft_model)

Under ZeRO-3 the frozen base weights are saved by torch checkpoints as themselves and released
before torch compares shapes: :func:`ds_chunkflow.deepspeed.deepspeed_adapter.checkpoint_determinism` (touch
point 7) turns that comparison off for such modules only.

Prompt-learning methods (prefix / prompt tuning) add virtual tokens to every call, which a
chunked sequence would see once per chunk: refused by the guard (:func:`check_peft`).

Quantised bases (bitsandbytes 4-bit / 8-bit: QLoRA) run their matmuls in CUDA kernels only;
without CUDA they are refused here before training (:func:`check_quantized`).

The recipe::

    model = apply_lora(model, r=16, alpha=32, dropout=0.05)      # before ds_chunkflow.initialize
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    engine, *_ = ds_chunkflow.initialize(model=model, optimizer=optimizer, config=...)
    ...
    save_adapter(engine, "out/adapter")                           # every rank (ZeRO-3: a gather)
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch
from torch import nn

from ds_chunkflow.hf import transformers_adapter
from ds_chunkflow.hf.guard import ModelRefused
from ds_chunkflow.hf.model import base_model_of, is_peft_model


class LoraRefused(ModelRefused):
    """A PEFT setup ChunkFlow cannot train here (quantised base without CUDA, prompt learning)."""


# ---------------------------------------------------------------------------- refusals
_QUANTIZED_CLASSES = ("Linear4bit", "Linear8bitLt", "Params4bit", "Int8Params")


def quantization_of(model: nn.Module) -> str | None:
    """What quantises ``model``'s weights (bitsandbytes 4/8-bit modules or a ``quantization_config``), or None."""
    base = base_model_of(model)
    for name, module in base.named_modules():
        if type(module).__name__ in _QUANTIZED_CLASSES:
            return f"bitsandbytes {type(module).__name__} at {name or '(root)'}"
        for pname, p in module.named_parameters(recurse=False):
            if type(p).__name__ in _QUANTIZED_CLASSES:
                return f"bitsandbytes {type(p).__name__} parameter {name}.{pname}"
    q = getattr(getattr(base, "config", None), "quantization_config", None)
    if q is not None:
        q = q if isinstance(q, dict) else (q.to_dict() if hasattr(q, "to_dict") else vars(q))
        bits = "4-bit" if q.get("load_in_4bit") else "8-bit" if q.get("load_in_8bit") else None
        return f"{q.get('quant_method', 'quantization_config')}" + (f" {bits}" if bits else "")
    return None


def check_quantized(model: nn.Module, cuda_available: bool | None = None) -> None:
    """Refuses (:class:`LoraRefused`) a quantised base without CUDA: bitsandbytes' kernels need it."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    what = quantization_of(model)
    if what is not None and not cuda:
        raise LoraRefused(f"{type(base_model_of(model)).__name__} is quantised ({what}): QLoRA's quantised "
                          "matmuls (bitsandbytes) need a CUDA GPU and none is available. Load the base model "
                          "unquantised (e.g. dtype=torch.bfloat16) to train LoRA on the CPU, or run on a GPU")


def check_peft(model: nn.Module) -> None:
    """Refuses PEFT methods that are not exact under chunking (prompt learning: virtual tokens per call)."""
    if not is_peft_model(model):
        return
    config = model.active_peft_config
    if getattr(config, "is_prompt_learning", False):
        raise LoraRefused(f"{config.peft_type} adds virtual tokens to every forward call, and ChunkFlow calls the "
                          "model once per chunk, so a long sample would see them once per chunk. Use LoRA "
                          "(ds_chunkflow.hf.lora.apply_lora) or another adapter that changes weights, not inputs")


# ---------------------------------------------------------------------------- LoRA
def decoder_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Linear`` inside a decoder block (transformers'
    ``GradientCheckpointingLayer``), so never the LM head or the embeddings."""
    GradientCheckpointingLayer = transformers_adapter.gradient_checkpointing_layer()
    base = base_model_of(model)
    blocks = [n for n, m in base.named_modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise ValueError(f"{type(base).__name__} has no transformers decoder blocks (GradientCheckpointingLayer): "
                         "give apply_lora target_modules explicitly")
    return [n for n, m in base.named_modules()
            if isinstance(m, nn.Linear) and any(n.startswith(b + ".") for b in blocks)]


def default_target_modules(model: nn.Module) -> list[str]:
    """The leaf names (``q_proj``, ``down_proj``, ...) of :func:`decoder_linear_names`, as PEFT matches them
    (a module whose name ends with one); the full names where a leaf name also occurs outside the blocks."""
    inside = decoder_linear_names(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in inside})
    outside = [n for n, m in base_model_of(model).named_modules()
               if isinstance(m, nn.Linear) and n not in set(inside)]
    if any(n.rsplit(".", 1)[-1] in leaves for n in outside):
        return inside
    return leaves


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               target_modules: Iterable[str] | str | None = None, **lora_options: Any) -> nn.Module:
    """``model`` with LoRA adapters (a ``peft.PeftModelForCausalLM``): only the adapters train.

    ``r``: adapter rank; ``alpha``: scale numerator (the update is ``B A x * alpha / r``); ``dropout``:
    on the adapter's input (replayed exactly on a chunk's recompute); ``target_modules``: PEFT's (names
    or a regex), default every ``nn.Linear`` inside the decoder blocks (:func:`default_target_modules`).
    ``lora_options`` go to ``peft.LoraConfig`` (e.g. ``init_lora_weights``, ``use_rslora``). Refuses a
    quantised base without CUDA (:func:`check_quantized`). Call before ``ds_chunkflow.initialize`` and
    build the optimizer over ``p.requires_grad`` parameters (the base is frozen by PEFT).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("apply_lora needs peft: pip install 'ds_chunkflow[lora]'") from e
    for name, value in (("r", r), ("alpha", alpha)):
        if not value > 0:
            raise ValueError(f"apply_lora: {name} must be > 0, got {value!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"apply_lora: dropout must be in [0, 1), got {dropout!r}")
    check_quantized(model)
    targets = default_target_modules(model) if target_modules is None else target_modules
    targets = targets if isinstance(targets, str) else list(targets)
    config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=targets, **lora_options)
    return get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train (for the optimizer): the adapters of a PEFT model."""
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter of ``model`` (an engine's module or a ``PeftModel``) as a full CPU tensor.

    Collective under ZeRO-3 (call on every rank): the partitioned adapters are gathered
    (``deepspeed.zero.GatheredParameters``), only them, never the frozen base."""
    module = getattr(model, "module", model)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    from ds_chunkflow.deepspeed.deepspeed_adapter import is_zero3_param

    partitioned = [p for _, p in named if is_zero3_param(p)]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            return {n: p.detach().to("cpu", copy=True) for n, p in named}
    return {n: p.detach().to("cpu", copy=True) for n, p in named}


def save_adapter(model: nn.Module, save_dir: str | os.PathLike, rank: int | None = None) -> None:
    """Writes the PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) of ``model`` (an
    engine or a ``PeftModel``) to ``save_dir``, loadable with ``PeftModel.from_pretrained(base, save_dir)``.

    Call on every rank: under ZeRO-3 the adapters are gathered first (:func:`adapter_state_dict`);
    rank 0 writes (``rank``: this process's rank, default ``torch.distributed``'s, or 0)."""
    module = getattr(model, "module", model)
    if not is_peft_model(module):
        raise TypeError(f"save_adapter: {type(module).__name__} is not a PEFT model")
    state = adapter_state_dict(module)
    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        module.save_pretrained(os.fspath(save_dir), state_dict=state)


__all__ = ["LoraRefused", "adapter_state_dict", "apply_lora", "base_model_of", "check_peft", "check_quantized",
           "decoder_linear_names", "default_target_modules", "is_peft_model", "quantization_of", "save_adapter",
           "trainable_parameters"]
