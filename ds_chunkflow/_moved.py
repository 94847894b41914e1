"""Old module paths (before the sub-package layout) still import, with a DeprecationWarning.

``import ds_chunkflow.chunking`` gives the module now at ``ds_chunkflow.plan.chunking``; the old name is an alias
of the same module object, so patching through either name patches both. To be removed in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "chunking": "plan.chunking",
    "scheduler": "plan.schedule",
    "batch_plan": "runtime.batch_plan",
    "pipeline.planner": "plan.planner",
    "pipeline.simulate": "plan.simulate",
    "attention": "ops.attention",
    "kernels": "ops.kernels",
    "fused_ops": "ops.fused_ops",
    "varlen": "ops.varlen",
    "state": "ops.state",
    "mixers": "ops.mixers",
    "cuda_streams": "ops.cuda_streams",
    "sequence_parallel": "ops.sequence_parallel",
    "batch": "runtime.batch",
    "chunk_core": "runtime.chunk",
    "executor": "runtime.executor",
    "memory": "runtime.memory",
    "step": "runtime.step",
    "hf_model": "hf.model",
    "transformers_adapter": "hf.transformers_adapter",
    "guard": "hf.guard",
    "loading": "hf.loading",
    "lora": "hf.lora",
    "engine": "deepspeed.engine",
    "initialization": "deepspeed.initialize",
    "deepspeed_adapter": "deepspeed.deepspeed_adapter",
    "checkpoint": "deepspeed.checkpoint",
    "retention": "deepspeed.retention",
    "monitor": "deepspeed.monitor",
    "autotune": "deepspeed.autotune",
    "distributed": "deepspeed.distributed",
    "lr_schedule": "deepspeed.lr_schedule",
    "hf_data": "data.hf_data",
    "chat_labels": "data.chat_labels",
    "sampler": "data.sampler",
    "data_mix": "data.mix",
}
"""Old path under ``ds_chunkflow`` -> new path under ``ds_chunkflow``."""


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        return importlib.import_module(self.new)

    def exec_module(self, module):
        pass


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname.partition("ds_chunkflow.")[2]
        if not fullname.startswith("ds_chunkflow.") or old not in MOVED:
            return None
        new = "ds_chunkflow." + MOVED[old]
        warnings.warn(f"{fullname} moved to {new}; the old path goes away in 0.3", DeprecationWarning, stacklevel=2)
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
