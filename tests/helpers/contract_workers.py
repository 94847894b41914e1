"""Functions run inside spawned ranks for tests/ops/test_cuda_contracts.py (must be importable by name)."""

import types

import torch

from tests.helpers.sequence_parallel_workers import my_rows, row_shard


def sp_varlen_attention(rank, world, num_tokens, out_path):
    """chunkflow_attention of a state-free packed chunk under sequence parallelism, through a flash-attn varlen
    stand-in, against the same call on the whole chunk without sequence parallelism; saves what it found."""
    import torch.distributed as dist

    import ds_chunkflow
    from ds_chunkflow.deepspeed.deepspeed_adapter import all_to_all_dim0
    from ds_chunkflow.ops import varlen
    from ds_chunkflow.ops.attention import chunkflow_attention
    from ds_chunkflow.ops.context import ChunkContext, SegmentSpec
    from ds_chunkflow.ops.sequence_parallel import UlyssesChunk
    from tests.ops.test_varlen import VarlenStandIn

    ds_chunkflow.init_distributed()  # DeepSpeed's comm on gloo (CPU accelerator), no shm op build
    fn = VarlenStandIn()
    varlen.varlen_fn_for = lambda q, dropout, head_dim=None: fn  # this process only: the CUDA fp16 gate
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d = 4, 2, 8
    q = torch.randn(1, heads, num_tokens, d, dtype=torch.float64, generator=g)
    k, v = (torch.randn(1, kv_heads, num_tokens, d, dtype=torch.float64, generator=g) for _ in range(2))
    dout = torch.randn(1, num_tokens, heads, d, dtype=torch.float64, generator=g)
    lengths = [5, num_tokens - 7, 2]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    module = types.SimpleNamespace(layer_idx=0, is_causal=True)

    def segments():
        return [SegmentSpec(s, n) for s, n in zip(starts, lengths)]

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = chunkflow_attention(module, *full, None, scaling=0.3, chunkflow=ChunkContext(segments()))
    ref.backward(dout)

    lo, hi = my_rows(rank, world, num_tokens)

    def shard(t, dim):
        return row_shard(t, dim, rank, world, num_tokens)

    mine = [shard(t, 2).requires_grad_() for t in (q, k, v)]
    sp = UlyssesChunk(dist.new_group([0, 1]), world, num_tokens, all_to_all_dim0)
    out, _ = chunkflow_attention(module, *mine, None, scaling=0.3, chunkflow=ChunkContext(segments(), sp=sp))
    out.backward(shard(dout, 1))
    n = hi - lo
    torch.save({"shape": tuple(out.shape), "calls": len(fn.calls),
                "out_err": (out[:, :n] - ref[:, lo:hi]).abs().max().item(),
                "grad_errs": [(m.grad[:, :, :n] - f.grad[:, :, lo:hi]).abs().max().item()
                              for m, f in zip(mine, full)]}, f"{out_path}.{rank}")
