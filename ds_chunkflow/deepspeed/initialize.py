"""``ds_chunkflow.initialize``: DeepSpeed's own ``initialize`` with ChunkFlow's engine classes.

The ``chunkflow`` section is split off and validated (with the DeepSpeed keys it depends
on) by :func:`ds_chunkflow.config.split_config`, then ``deepspeed.initialize`` runs
unchanged except for the engine class it constructs (see
:func:`ds_chunkflow.deepspeed.deepspeed_adapter.engine_classes`, the one place that swaps it), so every
DeepSpeed argument
(``mpu``, ``mesh_param``, ``config_params``, ``distributed_port``, ``collate_fn``,
``dist_init_required``) means what it means there.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from ds_chunkflow.config import ChunkFlowConfig, split_config
from ds_chunkflow.deepspeed import deepspeed_adapter as adapter
from ds_chunkflow.deepspeed.autotune import AutotuneError, engine_resolver, needs_autotune


def initialize(args: Any = None, model: torch.nn.Module | None = None, optimizer=None, model_parameters=None,
               training_data=None, lr_scheduler=None, config: dict | str | Path | None = None,
               config_params: dict | str | Path | None = None, **kwargs):
    """Same arguments and 4-tuple as ``deepspeed.initialize``.

    ``config`` (or ``config_params``, or ``args.deepspeed_config``) may be a dict or a
    JSON/YAML path. With a ``chunkflow`` section (enabled) the engine is a
    :class:`~ds_chunkflow.deepspeed.engine.ChunkFlowEngine` (a
    :class:`~ds_chunkflow.pipeline.engine.ChunkFlowPipelineEngine` for a ``PipelineModule``)
    and ``training_data`` (an :class:`~ds_chunkflow.data.jsonl.SFTDataset`) feeds its global-batch
    sampler; without one this is plain ``deepspeed.initialize``. ``chunk_size: auto`` /
    ``keep_chunks: auto`` are resolved once, inside the engine's constructor, so the returned engine's
    ``chunkflow_config`` is final (:func:`ds_chunkflow.deepspeed.autotune.resolve_auto`:
    ``engine.chunkflow_autotune`` says what and why).
    """
    import deepspeed

    if model is None:
        raise ValueError("initialize: model is required")
    config = config if config is not None else config_params
    if config is None and getattr(args, "deepspeed_config", None):
        config, args.deepspeed_config = args.deepspeed_config, None  # read here, not twice
    if config is None:
        raise ValueError("initialize: pass config= (dict, or path to a JSON/YAML ds_config) or args.deepspeed_config")
    from deepspeed.pipe import PipelineModule

    cf, ds_config = split_config(config, pipeline=isinstance(model, PipelineModule))
    adapter.decide_shm_comm_build()
    if cf is None:
        return deepspeed.initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                    training_data=training_data, lr_scheduler=lr_scheduler, config=ds_config,
                                    **kwargs)
    if needs_autotune(cf) and isinstance(model, PipelineModule):
        raise AutotuneError("chunkflow.chunk_size / keep_chunks: auto is not supported with pipeline parallelism "
                            "(the probe runs the whole model on one rank); set numbers")
    if (ds_config.get("zero_optimization") or {}).get("stage", 0) == 3 and not isinstance(model, PipelineModule):
        adapter.zero3_leaf_moe_blocks(model)  # MoE blocks as one ZeRO-3 unit, or ranks' call traces differ and hang
    from ds_chunkflow.deepspeed.engine import ChunkFlowMixin

    return adapter.initialize_with_engines(*_engine_factories(cf, training_data), expected=ChunkFlowMixin,
                                           args=args, model=model, optimizer=optimizer,
                                           model_parameters=model_parameters, training_data=None,
                                           lr_scheduler=lr_scheduler, config=ds_config, **kwargs)


def _engine_factories(cf: ChunkFlowConfig, training_data):
    """The two engine classes with their ChunkFlow arguments bound. ``auto`` is resolved inside the
    data-parallel engine's constructor (once, before the first plan; the same choice on every rank), so
    the engine ``initialize`` returns holds its final config from the start."""
    from ds_chunkflow.deepspeed.engine import ChunkFlowEngine
    from ds_chunkflow.pipeline.engine import ChunkFlowPipelineEngine

    extra = dict(chunkflow_config=cf, chunkflow_data=training_data)
    resolve = engine_resolver(cf, training_data)
    engine = functools.partial(ChunkFlowEngine, **extra, **({"chunkflow_resolve": resolve} if resolve else {}))
    return engine, functools.partial(ChunkFlowPipelineEngine, **extra)
