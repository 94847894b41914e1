"""ds_chunkflow: ChunkFlow (ICML 2025) long-context fine-tuning for DeepSpeed."""

from .config import ChunkFlowConfig, ConfigError
from .step import chunked_forward_backward, chunked_step


def initialize(*args, **kwargs):
    """See :func:`ds_chunkflow.initialize.initialize` (imported lazily: deepspeed is heavy)."""
    from .initialize import initialize as _initialize

    return _initialize(*args, **kwargs)


__all__ = ["ChunkFlowConfig", "ConfigError", "chunked_forward_backward", "chunked_step", "initialize"]
__version__ = "0.1.0"
