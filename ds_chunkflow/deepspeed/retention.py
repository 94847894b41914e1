"""Checkpoint retention: keep the newest N complete checkpoints, delete the rest crash-safely.

Call it after :meth:`~ds_chunkflow.deepspeed.engine.ChunkFlowMixin.save_checkpoint` returned (the new tag's
manifest and ``latest`` are written by then)::

    engine.save_checkpoint(output_dir)
    prune_checkpoints(output_dir, keep=3)        # on every rank; only rank 0 touches the disk

What is kept, from what is on disk at the time of the call (:mod:`ds_chunkflow.deepspeed.checkpoint`):

* the ``keep`` newest complete tags (manifest present and every listed file intact), by the manifest's
  global step;
* the tag ``latest`` names, whatever its age or state;
* every tag that is not complete and not a torn ChunkFlow save (a stock DeepSpeed tag, a directory
  that is not ours): never touched.

What is deleted: complete tags older than those kept, and torn ChunkFlow saves (saving mark, no
manifest) older than the newest complete tag, which a resume can never pick.

Deleting is crash-safe: a tag is first renamed ``.ds_chunkflow_deleting.<tag>`` (one atomic
``rename`` in the same directory, then an fsync of the directory), and only then emptied. So a kill
at any moment leaves every tag either whole under its own name or gone from the tags a resume sees
(:func:`ds_chunkflow.deepspeed.checkpoint.is_trash`)::

    before      latest=g4   g1 g2 g3 g4
    rename      latest=g4   .ds_chunkflow_deleting.g1  g2 g3 g4     <- kill here: g2..g4 resumable
    rmtree                  (g1's files go; its name is already invisible)
    done        latest=g4   g2 g3 g4

Half-deleted ``.ds_chunkflow_deleting.*`` directories left by a kill are removed by the next call.
The directory is assumed shared by the ranks (rank 0's manifest lists every rank's files): with
node-local checkpoint directories the other nodes' files are not deleted.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from ds_chunkflow.deepspeed.checkpoint import (
    MANIFEST,
    SAVING,
    TRASH_PREFIX,
    _fsync_path,
    check_tag,
    is_trash,
    read_latest,
)


@dataclass
class PrunePlan:
    """Which tags of a directory stay and which go, and why (pure: decided from what is on disk)."""

    keep: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # tag -> why it is deleted


def _saving_step(tag_dir: str) -> int | None:
    """The global step a torn ChunkFlow save recorded in its saving mark (None: not a torn ChunkFlow save)."""
    mark = os.path.join(tag_dir, SAVING)
    if os.path.isfile(os.path.join(tag_dir, MANIFEST)) or not os.path.isfile(mark):
        return None
    try:
        with open(mark) as f:
            return int(f.read().strip() or -1)
    except (OSError, ValueError):
        return -1


def plan_prune(save_dir, keep: int) -> PrunePlan:
    """What :func:`prune_checkpoints` would delete in ``save_dir`` keeping ``keep`` complete tags."""
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise ValueError(f"keep: the number of complete checkpoints to keep must be an integer >= 1, got {keep!r}")
    save_dir = os.fspath(save_dir)
    latest, _ = read_latest(save_dir)
    complete, torn = [], []
    for name in sorted(os.listdir(save_dir)):
        tag_dir = os.path.join(save_dir, name)
        if is_trash(name) or not os.path.isdir(tag_dir):
            continue
        manifest, _ = check_tag(save_dir, name)
        if manifest is not None:
            complete.append((int(manifest["global_step"]), name))
        elif (step := _saving_step(tag_dir)) is not None:
            torn.append((step, name))
    complete.sort(reverse=True)
    kept = [name for _, name in complete[:keep]]
    plan = PrunePlan(keep=kept + ([latest] if latest is not None and latest not in kept else []))
    doomed = [(step, name, f"complete, step {step}: older than the newest {keep}")
              for step, name in complete[keep:] if name != latest]
    newest = complete[0][0] if complete else None
    doomed += [(step, name, f"torn save of step {step}, older than the newest complete tag (step {newest})")
               for step, name in torn if name != latest and newest is not None and step < newest]
    for _, name, reason in sorted(doomed):  # oldest first
        plan.delete.append(name)
        plan.reasons[name] = reason
    return plan


def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=False)


def prune_checkpoints(save_dir, keep: int, rank: int | None = None) -> list[str]:
    """Deletes what :func:`plan_prune` says, crash-safely (see the module docstring); returns the tags deleted.

    Only ``rank`` 0 (default: ``torch.distributed``'s rank, or 0) acts; no collective, so the other ranks
    may call it too and return at once. Leftovers of a killed earlier call are removed first."""
    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0:
        return []
    save_dir = os.fspath(save_dir)
    for name in sorted(os.listdir(save_dir)):  # what a kill during an earlier call left half-deleted
        if is_trash(name) and os.path.isdir(os.path.join(save_dir, name)):
            _remove(os.path.join(save_dir, name))
    plan = plan_prune(save_dir, keep)
    for tag in plan.delete:
        trash = os.path.join(save_dir, TRASH_PREFIX + tag)
        os.rename(os.path.join(save_dir, tag), trash)  # atomic: whole under its name, or invisible
        _fsync_path(save_dir)
        _remove(trash)
    return plan.delete


__all__ = ["PrunePlan", "plan_prune", "prune_checkpoints"]
