"""Loading a Hugging Face checkpoint for a ds_config: partitioned at load time under ZeRO-3.

``AutoModelForCausalLM.from_pretrained`` materialises the whole model in every process; under
ZeRO-3 a 7B model would then be 28 GB of fp32 per rank before DeepSpeed partitions it. With a
``transformers.integrations.HfDeepSpeedConfig`` alive, ``from_pretrained`` instead builds the
model inside ``deepspeed.zero.Init`` and loads each weight straight into its partition, so a
rank holds about 1/W of the parameters from the start (transformers' own ZeRO-3 path; it needs
``accelerate``). :func:`load_pretrained` does that when the config says stage 3 and a plain
load otherwise, in the dtype the config trains in (bf16 / fp16 when enabled, else fp32).

The ``HfDeepSpeedConfig`` is kept alive on the returned model (``model.hf_deepspeed_config``),
as transformers requires for the model's life: while it lives, transformers treats the process
as running ZeRO-3 (e.g. a later ``from_pretrained`` is partitioned too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ds_chunkflow.config import split_config


def training_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The parameter dtype DeepSpeed trains in for this config: bf16 / fp16 when enabled, else fp32."""
    if (ds_config.get("bf16") or {}).get("enabled"):
        return torch.bfloat16
    if (ds_config.get("fp16") or {}).get("enabled"):
        return torch.float16
    return torch.float32


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def load_pretrained(path: str | Path, config: dict[str, Any] | str | Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path)`` for a ds_config (a dict or JSON/YAML path, with or
    without its ``chunkflow`` section); under ZeRO-3 partitioned at load (initialises torch.distributed
    first, as ``zero.Init`` needs). ``kwargs`` go to ``from_pretrained`` (``dtype`` overrides the config's)."""
    from transformers import AutoModelForCausalLM

    _, ds_config = split_config(config)
    kwargs.setdefault("dtype", training_dtype(ds_config))
    if zero_stage(ds_config) != 3:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    from ds_chunkflow.deepspeed.distributed import init_distributed
    from ds_chunkflow.hf.transformers_adapter import hf_deepspeed_config

    init_distributed()
    keeper = hf_deepspeed_config()(_resolved_for_hf(ds_config))
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.hf_deepspeed_config = keeper
    return model


def _resolved_for_hf(ds_config: dict[str, Any]) -> dict[str, Any]:
    """HfDeepSpeedConfig reads the batch keys; ChunkFlow fixes them (micro-batch 1, no accumulation)."""
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, **ds_config}
