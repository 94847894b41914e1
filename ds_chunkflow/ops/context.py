"""What the attention and mixer layers are told about the chunk being run: its segments and their state.

A plain record (no kernels, no DeepSpeed): the runtime builds one per model call and passes it as the
``chunkflow`` forward kwarg, which transformers threads to every attention layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ds_chunkflow.ops.state import GroupState


@dataclass
class SegmentSpec:
    """Rows ``[start, start + length)`` of the chunk; first token at sequence ``position``."""

    start: int
    length: int
    position: int = 0
    state: GroupState | None = None


@dataclass
class ChunkContext:
    """What the attention layers need to know about the chunk being run."""

    segments: list[SegmentSpec]
    num_layer_calls: int = 0
    sp: object | None = None
    """A sequence-parallel shard's :class:`~ds_chunkflow.ops.sequence_parallel.UlyssesChunk`: the layer
    gets this rank's rows and the segments describe the whole chunk."""
