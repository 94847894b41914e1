"""The aten ops behind each fused backend of :mod:`ds_chunkflow.ops.kernels`, and what their kernels assume.

Every function takes and returns ``[B, H, M, d]`` tensors (head dims already padded and made
contiguous by ``kernels._prepare``) and a mask argument (``is_causal``, or a FlashAttention
window); each returns ``(out, lse)`` or ``(dq, dk, dv)``. What the CUDA kernels assume beyond
the op schemas, and how it is met here:

    op                                   assumes                                 here
    _scaled_dot_product_flash_attention  stride-1 rows, head dim % 8             kernels._prepare
    _efficient_attention_backward        out's row stride = heads * head dim     rows_major(out)
    _flash_attention_forward/_backward   [B, M, H, d]; bottom-right local mask   transposed views;
                                         (window_size_left/right); lse +inf      kernels.flash_window;
                                         for a row that sees no key              mapped to -inf

``tests/ops/test_cuda_contracts.py`` registers CPU stand-ins for these ops that assert the same.
"""

from __future__ import annotations

import math

import torch


def cpu_flash_forward(q, k, v, is_causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=None,
                                                                       scale=scale)


def cpu_flash_backward(dout, q, k, v, out, lse, is_causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.contiguous(), q, k, v, out, lse.contiguous(), 0.0, is_causal, attn_mask=None, scale=scale)


def cuda_flash_forward(q, k, v, is_causal: bool, scale: float):
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)
    return out, lse


def cuda_flash_backward(dout, q, k, v, out, lse, is_causal: bool, scale: float):
    # dropout 0: the philox seed/offset are not used; shapes/dtypes as the forward returns them (empty: fill
    # kernels for uint64 are not guaranteed on CUDA)
    seed = torch.empty(2, dtype=torch.uint64, device=q.device)
    offset = torch.empty((), dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, is_causal, seed, offset, scale=scale)
    return dq, dk, dv


def cuda_efficient_forward(q, k, v, is_causal: bool, scale: float):
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, is_causal,
                                                                             scale=scale)
    return out, lse


def rows_major(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, M, d]`` with the memory of a contiguous ``[B, M, H, d]`` (row stride ``H * d``, head stride ``d``).

    The memory-efficient backward takes only the batch and head strides of ``out`` and hard-codes its row
    stride as ``num_heads * head_dim`` (``o_strideM()`` in ``kernel_backward.h``; the sm80 fp16/bf16 path
    reads ``output_ptr + row * o_strideM()`` for ``D = rowsum(dO * O)``). A ``[B, H, M, d]``-contiguous
    ``out`` has row stride ``d``, so the delta term would read other rows' and heads' memory: dq and dk
    wrong. PyTorch's own callers pass ``out`` in this layout (the forward returns it so)."""
    b, h, m, d = t.shape
    if t.stride(3) == 1 and (m == 1 or t.stride(2) == h * d):  # the head stride is read from the tensor
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def cuda_efficient_backward(dout, q, k, v, out, lse, is_causal: bool, scale: float):
    seed = torch.empty((), dtype=torch.int64, device=q.device)  # dropout 0: not used
    offset = torch.empty((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, rows_major(out), lse, seed, offset, 0.0, [True, True, True, False], is_causal,
        scale=scale)
    return dq, dk, dv


def cuda_flash_window_forward(q, k, v, window: tuple[int, int], scale: float):
    # the op takes [B, M, H, d] (what the SDPA flash op passes it: q.transpose(1, 2)); lse is [B, H, M]
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, q.shape[2], k.shape[2], 0.0, False,
        False, scale=scale, window_size_left=window[0], window_size_right=window[1])
    # a row with no visible key: FlashAttention-2 writes lse +inf (0 out); the merge needs -inf
    return out.transpose(1, 2), lse.masked_fill(lse == math.inf, -math.inf)


def cuda_flash_window_backward(dout, q, k, v, out, lse, window: tuple[int, int], scale: float):
    seed = torch.empty(2, dtype=torch.uint64, device=q.device)  # dropout 0: not used
    offset = torch.empty((), dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2), lse,
        None, None, q.shape[2], k.shape[2], 0.0, False, seed, offset, scale=scale, window_size_left=window[0],
        window_size_right=window[1])
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
