"""The few process-group helpers the engine needs; groups are always passed explicitly."""

from __future__ import annotations

import torch
import torch.distributed as dist


def agree_on_errors(error: BaseException | None, group=None, device="cpu") -> None:
    """Raises on every rank if any rank hit an error before a collective section.

    Keeps one rank's bad input from leaving the others blocked in the next collective.
    """
    if not dist.is_initialized():
        if error is not None:
            raise error
        return
    flag = torch.tensor([1.0 if error is not None else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    if flag.item() > 0:
        raise RuntimeError("another rank failed before this collective section (see its error)")


def all_reduce(values: list[float], op: str = "sum", group=None, device="cpu") -> list[float]:
    """Elementwise ``sum`` / ``max`` / ``min`` of a few floats over ``group``."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op],
                    group=group)
    return t.tolist()


def init_distributed() -> None:
    """``deepspeed.init_distributed`` on the accelerator's backend
    (shm op: :mod:`ds_chunkflow.deepspeed.deepspeed_adapter`)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from ds_chunkflow.deepspeed.deepspeed_adapter import decide_shm_comm_build

    decide_shm_comm_build()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
