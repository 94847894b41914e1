"""Functions run inside spawned ranks for tests/ops/test_sequence_parallel.py (must be importable by name)."""

import types

import torch


def my_rows(rank: int, world: int, num_tokens: int) -> tuple[int, int]:
    """``[lo, hi)``: this rank's rows of a chunk of ``num_tokens`` split over ``world`` ranks (ceil(T / P) each)."""
    rows = -(-num_tokens // world)
    return rank * rows, min(num_tokens, (rank + 1) * rows)


def row_shard(t: torch.Tensor, dim: int, rank: int, world: int, num_tokens: int) -> torch.Tensor:
    """This rank's rows of ``t`` along ``dim``, padded to ceil(T / P) with junk (pad rows never meet a real token)."""
    lo, hi = my_rows(rank, world, num_tokens)
    mine = t.narrow(dim, lo, hi - lo)
    pad = list(mine.shape)
    pad[dim] = -(-num_tokens // world) - (hi - lo)
    return torch.cat([mine, torch.full(pad, 7.0, dtype=t.dtype)], dim=dim)


def sp_sink_softcap_attention(rank, world, num_tokens, out_path):
    """chunkflow_attention of a packed chunk with attention sinks and a logit softcap under sequence parallelism
    (each rank: all rows, its block of heads, so its block of the sinks) against the same call on the whole chunk
    without it; saves the output / q, k, v gradient errors of this rank's rows and this rank's sinks gradient."""
    import torch.distributed as dist

    import ds_chunkflow
    from ds_chunkflow.deepspeed.deepspeed_adapter import all_to_all_dim0
    from ds_chunkflow.ops.attention import chunkflow_attention
    from ds_chunkflow.ops.context import ChunkContext, SegmentSpec
    from ds_chunkflow.ops.sequence_parallel import UlyssesChunk

    ds_chunkflow.init_distributed()  # DeepSpeed's comm on gloo (CPU accelerator), no shm op build
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d = 4, 2, 8
    q = torch.randn(1, heads, num_tokens, d, dtype=torch.float64, generator=g)
    k, v = (torch.randn(1, kv_heads, num_tokens, d, dtype=torch.float64, generator=g) for _ in range(2))
    dout = torch.randn(1, num_tokens, heads, d, dtype=torch.float64, generator=g)
    sinks = torch.tensor([-1.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    lengths = [5, num_tokens - 7, 2]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    module = types.SimpleNamespace(layer_idx=0, is_causal=True)
    kwargs = dict(scaling=0.3, softcap=0.5)

    def segments():
        return [SegmentSpec(s, n) for s, n in zip(starts, lengths)]

    full = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    ref, _ = chunkflow_attention(module, *full[:3], None, s_aux=full[3], chunkflow=ChunkContext(segments()),
                                 **kwargs)
    ref.backward(dout)

    lo, hi = my_rows(rank, world, num_tokens)

    def shard(t, dim):
        return row_shard(t, dim, rank, world, num_tokens)

    mine = [shard(t, 2).requires_grad_() for t in (q, k, v)]
    my_sinks = sinks.clone().requires_grad_()
    sp = UlyssesChunk(dist.new_group([0, 1]), world, num_tokens, all_to_all_dim0)
    out, _ = chunkflow_attention(module, *mine, None, s_aux=my_sinks, chunkflow=ChunkContext(segments(), sp=sp),
                                 **kwargs)
    out.backward(shard(dout, 1))
    n = hi - lo
    torch.save({"out_err": (out[:, :n] - ref[:, lo:hi]).abs().max().item(),
                "grad_errs": [(m.grad[:, :, :n] - f.grad[:, :, lo:hi]).abs().max().item()
                              for m, f in zip(mine, full)],
                "sinks_grad": my_sinks.grad, "ref_sinks_grad": full[3].grad}, f"{out_path}.{rank}")
