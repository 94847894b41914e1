"""ds_chunkflow: ChunkFlow (ICML 2025) long-context fine-tuning for DeepSpeed."""

from ds_chunkflow import _moved
from ds_chunkflow.config import ChunkFlowConfig, ConfigError
from ds_chunkflow.deepspeed.distributed import init_distributed
from ds_chunkflow.runtime.step import chunked_evaluate, chunked_forward_backward, chunked_step


def initialize(*args, **kwargs):
    """See :func:`ds_chunkflow.deepspeed.initialize.initialize` (imported lazily: deepspeed is heavy)."""
    from ds_chunkflow.deepspeed.initialize import initialize as _initialize

    return _initialize(*args, **kwargs)


def load_pretrained(*args, **kwargs):
    """See :func:`ds_chunkflow.hf.loading.load_pretrained`: from_pretrained, partitioned at load under ZeRO-3."""
    from ds_chunkflow.hf.loading import load_pretrained as _load

    return _load(*args, **kwargs)


def save_pretrained(*args, **kwargs):
    """See :func:`ds_chunkflow.hf.export.save_pretrained`: the engine's model as a Hugging Face directory."""
    from ds_chunkflow.hf.export import save_pretrained as _save

    return _save(*args, **kwargs)


__all__ = ["ChunkFlowConfig", "ConfigError", "chunked_evaluate", "chunked_forward_backward", "chunked_step",
           "init_distributed", "initialize", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"

_moved.install()  # old module paths (ds_chunkflow.chunking, ...) import with a DeprecationWarning
