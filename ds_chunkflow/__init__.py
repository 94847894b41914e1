"""ds_chunkflow: ChunkFlow (ICML 2025) long-context fine-tuning for DeepSpeed."""

from .step import chunked_forward_backward, chunked_step

__all__ = ["chunked_forward_backward", "chunked_step"]
__version__ = "0.1.0"
