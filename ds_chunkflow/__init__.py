"""ds_chunkflow: ChunkFlow (ICML 2025) long-context fine-tuning for DeepSpeed."""

from .config import ChunkFlowConfig, ConfigError
from .distributed import init_distributed
from .step import chunked_evaluate, chunked_forward_backward, chunked_step


def initialize(*args, **kwargs):
    """See :func:`ds_chunkflow.initialization.initialize` (imported lazily: deepspeed is heavy)."""
    from .initialization import initialize as _initialize

    return _initialize(*args, **kwargs)


def load_pretrained(*args, **kwargs):
    """See :func:`ds_chunkflow.loading.load_pretrained`: from_pretrained, partitioned at load under ZeRO-3."""
    from .loading import load_pretrained as _load

    return _load(*args, **kwargs)


def save_pretrained(*args, **kwargs):
    """See :func:`ds_chunkflow.export.save_pretrained`: the engine's model as a Hugging Face directory."""
    from .export import save_pretrained as _save

    return _save(*args, **kwargs)


__all__ = ["ChunkFlowConfig", "ConfigError", "chunked_evaluate", "chunked_forward_backward", "chunked_step",
           "init_distributed", "initialize", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"
