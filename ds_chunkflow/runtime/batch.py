"""Chunk descriptions -> the tensors of one model call.

A sequence is a dict with 1-D LongTensors ``input_ids`` and ``labels`` (transformers
convention: same length, -100 = no loss, position t predicts ``labels[t + 1]``).
Targets are shifted once per whole sequence (``targets[t] = labels[t + 1]``, the last
one -100) and only then cut, so a chunk border never loses a target and a packed
neighbour never becomes one. See :mod:`ds_chunkflow.plan.chunking` for the layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ds_chunkflow.constants import IGNORE_INDEX
from ds_chunkflow.plan.chunking import Chunk

SequenceDict = Mapping[str, torch.Tensor]


def validate_sequences(sequences: Sequence[SequenceDict]) -> list[int]:
    """Checks shapes and dtypes; returns the lengths. Errors name the sequence and field."""
    lengths = []
    for i, seq in enumerate(sequences):
        for key in ("input_ids", "labels"):
            if key not in seq:
                raise ValueError(f"sequences[{i}] has no '{key}'")
            t = seq[key]
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.long:
                got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"sequences[{i}]['{key}'] must be a 1-D torch.long tensor, got {got}")
        if seq["input_ids"].numel() != seq["labels"].numel():
            raise ValueError(
                f"sequences[{i}]: input_ids has {seq['input_ids'].numel()} tokens "
                f"but labels has {seq['labels'].numel()}"
            )
        if seq["input_ids"].numel() == 0:
            raise ValueError(f"sequences[{i}] is empty")
        lengths.append(int(seq["input_ids"].numel()))
    return lengths


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """``targets[t] = labels[t + 1]``; the last position has no target."""
    return torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])


def num_targets(labels: torch.Tensor) -> int:
    """Predicted tokens of one sequence: label positions t >= 1 that are not -100."""
    return int((labels[1:] != IGNORE_INDEX).sum())


def count_loss_tokens(sequences: Sequence[SequenceDict]) -> int:
    """Predicted tokens of a batch (the loss normaliser)."""
    return sum(num_targets(s["labels"]) for s in sequences)


@dataclass
class ChunkInputs:
    """Tensors for one chunk, batch dimension 1."""

    input_ids: torch.Tensor     # [1, T]
    position_ids: torch.Tensor  # [1, T]: restart per packed sequence, continue across dependent chunks
    targets: torch.Tensor       # [1, T]: next-token targets, -100 = no loss
    target_rows: torch.Tensor   # [n]: the rows with a target, found on the host (the loss reads no device value)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.target_rows.numel())

    def to(self, device: torch.device | str | None) -> "ChunkInputs":
        """The same tensors on ``device`` (one copy each, non-blocking from pinned memory where possible)."""
        if device is None or torch.device(device) == self.input_ids.device:
            return self
        return ChunkInputs(*(t.to(device, non_blocking=True) for t in
                             (self.input_ids, self.position_ids, self.targets, self.target_rows)))


def materialize(chunk: Chunk, sequences: Sequence[SequenceDict], targets: Sequence[torch.Tensor] | None = None,
                device: torch.device | str | None = None) -> ChunkInputs:
    """Cuts ``chunk``'s segments out of ``sequences``. ``targets`` may be precomputed per sequence."""
    ids, pos, tgt = [], [], []
    for s in chunk.segments:
        seq = sequences[s.seq_index]
        t = targets[s.seq_index] if targets is not None else shifted_targets(seq["labels"])
        end = s.start + s.length
        ids.append(seq["input_ids"][s.start:end])
        tgt.append(t[s.start:end])
        pos.append(torch.arange(s.start, end, dtype=torch.long))
    goals = torch.cat(tgt).cpu()
    return ChunkInputs(
        input_ids=torch.cat(ids).unsqueeze(0),
        position_ids=torch.cat(pos).unsqueeze(0),
        targets=goals.unsqueeze(0),
        target_rows=(goals != IGNORE_INDEX).nonzero().squeeze(1),
    ).to(device)
