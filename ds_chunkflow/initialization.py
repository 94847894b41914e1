"""``ds_chunkflow.initialize``: ``deepspeed.initialize`` with a ``chunkflow`` config section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import deepspeed
import torch

from .config import ConfigError, load_config_file, split_config
from .distributed import skip_shm_comm_build


def initialize(args: Any = None, model: torch.nn.Module | None = None, optimizer=None, model_parameters=None,
               training_data=None, lr_scheduler=None, config: dict | str | Path | None = None, **kwargs):
    """Same arguments and 4-tuple as ``deepspeed.initialize``.

    ``config`` (or ``args.deepspeed_config``) may be a dict or a JSON/YAML path. With a
    ``chunkflow`` section (enabled) the engine is a :class:`ChunkFlowEngine`, and
    ``training_data`` (an :class:`~ds_chunkflow.data.SFTDataset`) feeds its global-batch
    sampler; without one this is plain ``deepspeed.initialize``.
    """
    if model is None:
        raise ValueError("initialize: model is required")
    if config is None and getattr(args, "deepspeed_config", None):
        config, args.deepspeed_config = args.deepspeed_config, None
    if config is None:
        raise ValueError("initialize: pass config= (dict, or path to a JSON/YAML ds_config) or args.deepspeed_config")
    if not isinstance(config, dict):
        config = load_config_file(config)
    cf, ds_config = split_config(config)
    skip_shm_comm_build()
    if cf is None:
        return deepspeed.initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                    training_data=training_data, lr_scheduler=lr_scheduler, config=ds_config,
                                    **kwargs)
    from deepspeed import comm as dist
    from deepspeed import zero
    from deepspeed.accelerator import get_accelerator
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.config import DeepSpeedConfig

    from .engine import ChunkFlowEngine

    is_pipe = isinstance(model, PipelineModule)
    if is_pipe:
        stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
        if stage > 1:
            raise ConfigError(f"zero_optimization.stage: {stage} is not possible with pipeline parallelism "
                              "(DeepSpeed's PipelineEngine supports ZeRO 0 or 1); use stage 0 or 1")
    ds_config.setdefault("train_micro_batch_size_per_gpu", 1)
    ds_config.setdefault("gradient_accumulation_steps", 1)
    dist.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                          dist_init_required=kwargs.get("dist_init_required"))
    ds_config.pop("train_batch_size", None)  # derived: chunks, not samples, are the micro-batches
    zero.partition_parameters.shutdown_init_context()
    try:
        if is_pipe:
            from .pipeline.engine import ChunkFlowPipelineEngine

            config_class = DeepSpeedConfig(ds_config, model.mpu())
            deepspeed.set_optimizer_flags(config_class, model)
            engine = ChunkFlowPipelineEngine(args=args, model=model, optimizer=optimizer,
                                             model_parameters=model_parameters, training_data=None,
                                             lr_scheduler=lr_scheduler, mpu=model.mpu(), config=ds_config,
                                             config_class=config_class, chunkflow_config=cf,
                                             chunkflow_data=training_data, **kwargs)
        else:
            config_class = DeepSpeedConfig(ds_config)
            deepspeed.set_optimizer_flags(config_class, model)
            engine = ChunkFlowEngine(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                     training_data=None, lr_scheduler=lr_scheduler, config=ds_config,
                                     config_class=config_class, chunkflow_config=cf, chunkflow_data=training_data,
                                     **kwargs)
    finally:
        zero.partition_parameters.restore_init_context()
    engine._configure_python_gc()
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
