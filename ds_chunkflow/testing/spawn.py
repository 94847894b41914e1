"""Two-rank gloo harness: spawned processes, DeepSpeed's CPU accelerator, no launcher."""

import multiprocessing as mp
import os
import socket
import sys
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, args, errors, accelerator="cpu"):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                      DS_ACCELERATOR=accelerator, WANDB_MODE="offline", DS_CHUNKFLOW_SKIP_SHM_BUILD="1")
    try:
        import torch

        torch.set_num_threads(1)
        fn(rank, world, *args)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    # Every rank finished and the group is gone: leave without the interpreter's teardown, where a gloo
    # thread still joinable in a C++ destructor has aborted a finished rank ("terminate called without an
    # active exception", exit -6; seen once in CI after a pipeline test that raised on purpose).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, *args, world: int = 2, timeout: float = 300.0, accelerator: str = "cpu"):
    """Runs ``fn(rank, world, *args)`` on ``world`` processes; re-raises the first failure. ``accelerator``:
    DeepSpeed's (``DS_ACCELERATOR``): "cpu" (gloo) for the test suite, "cuda" (NCCL) for the gpu tier."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, errors, accelerator)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    if not errors.empty():
        rank, tb = errors.get()
        raise RuntimeError(f"rank {rank} failed:\n{tb}")
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes):
        raise RuntimeError(f"ranks exited with {codes} (timeout {timeout}s?)")
