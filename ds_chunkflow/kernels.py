"""Attention kernels with an explicit log-sum-exp, so blocks of keys can be merged.

Every kernel works on one *block*: queries at sequence positions ``[qp, qp + Tq)``
against keys at ``[kp, kp + Tk)`` (tensors ``[1, H, T, d]``, GQA already expanded),
with causal visibility by position (``k <= q``) and an optional sliding window
(``q - k < window``, transformers' convention). ``forward`` returns ``(out, lse)``;
``backward`` takes the *merged* ``out``/``lse`` of all blocks of a query row, which is
what makes block-wise gradients exact (ring-attention identity: ``D = rowsum(dO * O)``
and ``P = exp(S - lse)`` only need the merged row statistics).

Backends:
* ``cpu_flash``: PyTorch's fused CPU flash-attention ops (fp64/fp32/bf16/fp16); used for
  blocks that are either fully visible or exactly causal-square, without dropout;
* ``flash_attn``: the flash-attn package on CUDA, same block shapes (not exercised in
  CI: no GPU here);
* ``math``: explicit scores in fp32 (fp64 for fp64); any mask, window and dropout.
  The fallback for everything the fused kernels cannot express.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Block:
    """Positions of a query block and a key block, plus the masking they need."""

    q_pos: int
    k_pos: int
    tq: int
    tk: int
    window: int | None = None

    @property
    def fully_visible(self) -> bool:
        """Every key strictly precedes every query and sits inside the window."""
        last_key = self.k_pos + self.tk - 1
        if last_key > self.q_pos:
            return False
        return self.window is None or (self.q_pos + self.tq - 1) - self.k_pos < self.window

    @property
    def causal_square(self) -> bool:
        square = self.q_pos == self.k_pos and self.tq == self.tk
        return square and (self.window is None or self.tq <= self.window)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _visible(b: Block, device: torch.device) -> torch.Tensor:
    q = torch.arange(b.q_pos, b.q_pos + b.tq, device=device)[:, None]
    k = torch.arange(b.k_pos, b.k_pos + b.tk, device=device)[None, :]
    vis = k <= q
    if b.window is not None:
        vis &= (q - k) < b.window
    return vis


def _keep_mask(shape, p: float, seed: int, b: Block, device) -> torch.Tensor:
    # One generator per (step seed, block): a recomputed forward and the backward draw
    # exactly the mask the first forward drew.
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + b.q_pos * 7_919 + b.k_pos) % (2**63 - 1))
    return torch.rand(shape, generator=g, device=device) >= p


def _math_probs(q, k, b: Block, scale, lse=None):
    ct = _compute_dtype(q)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    s = s.masked_fill(~_visible(b, q.device), float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(s - safe.to(ct)[..., None]), lse


def math_forward(q, k, v, b: Block, scale: float, dropout: float = 0.0, seed: int = 0):
    p, lse = _math_probs(q, k, b, scale)
    if dropout > 0:
        p = p * _keep_mask(p.shape, dropout, seed, b, q.device) / (1 - dropout)
    out = torch.matmul(p, v.to(p.dtype))
    return out.to(q.dtype), lse.float() if q.dtype != torch.float64 else lse


def math_backward(dout, q, k, v, out, lse, b: Block, scale: float, dropout: float = 0.0, seed: int = 0):
    ct = _compute_dtype(q)
    p, _ = _math_probs(q, k, b, scale, lse=lse.to(ct))
    do = dout.to(ct)
    delta = (do * out.to(ct)).sum(-1, keepdim=True)
    dp = torch.matmul(do, v.to(ct).transpose(-1, -2))
    if dropout > 0:
        keep = _keep_mask(p.shape, dropout, seed, b, q.device) / (1 - dropout)
        dv = torch.matmul((p * keep).transpose(-1, -2), do)
        dp = dp * keep
    else:
        dv = torch.matmul(p.transpose(-1, -2), do)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, k.to(ct)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(ct)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def cpu_flash_forward(q, k, v, b: Block, scale: float):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, b.causal_square and not b.fully_visible, attn_mask=None, scale=scale)
    return out, lse


def cpu_flash_backward(dout, q, k, v, out, lse, b: Block, scale: float):
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.contiguous(), q, k, v, out, lse.contiguous(), 0.0, b.causal_square and not b.fully_visible,
        attn_mask=None, scale=scale)
    return dq, dk, dv


def _flash_attn_available(t: torch.Tensor) -> bool:
    if not t.is_cuda or t.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flash_attn_forward(q, k, v, b: Block, scale: float):
    from flash_attn.flash_attn_interface import _flash_attn_forward

    causal = b.causal_square and not b.fully_visible
    out, lse, _, _ = _flash_attn_forward(
        q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
        0.0, scale, causal=causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
        alibi_slopes=None, return_softmax=False)
    return out.transpose(1, 2), lse


def flash_attn_backward(dout, q, k, v, out, lse, b: Block, scale: float):
    from flash_attn.flash_attn_interface import _flash_attn_backward

    t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
    dq, dk, dv = torch.empty_like(t(q)), torch.empty_like(t(k)), torch.empty_like(t(v))
    _flash_attn_backward(t(dout), t(q), t(k), t(v), t(out), lse.contiguous(), dq, dk, dv, 0.0, scale,
                         causal=b.causal_square and not b.fully_visible, window_size_left=-1,
                         window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _pad_last(t: torch.Tensor, size: int) -> torch.Tensor:
    return t if t.shape[-1] == size else torch.nn.functional.pad(t, (0, size - t.shape[-1]))


def _fused_kernels(q, b: Block, dropout: float):
    """(forward, backward) of the fused backend for this block, or None for the math kernel."""
    if dropout != 0 or not (b.fully_visible or b.causal_square):
        return None
    if _flash_attn_available(q):
        return flash_attn_forward, flash_attn_backward
    if q.device.type == "cpu":
        return cpu_flash_forward, cpu_flash_backward
    return None


# The fused kernels need one head dim for q, k and v. MLA (DeepSeek-V3: qk 192, v 128) gets
# v zero-padded to the qk head dim: the padded output columns are exactly zero and are cut off,
# and the padded gradient columns of v are cut off too.
def block_forward(q, k, v, b: Block, scale: float, dropout: float = 0.0, seed: int = 0):
    """Dispatches one block to the fastest kernel that expresses it exactly."""
    fused = _fused_kernels(q, b, dropout)
    if fused is None:
        return math_forward(q, k, v, b, scale, dropout, seed)
    dv = v.shape[-1]
    out, lse = fused[0](q, k, _pad_last(v, q.shape[-1]), b, scale)
    return out[..., :dv], lse


def block_backward(dout, q, k, v, out, lse, b: Block, scale: float, dropout: float = 0.0, seed: int = 0):
    fused = _fused_kernels(q, b, dropout)
    if fused is None:
        return math_backward(dout, q, k, v, out, lse, b, scale, dropout, seed)
    d, dv_size = q.shape[-1], v.shape[-1]
    dq, dk, dv = fused[1](_pad_last(dout, d), q, k, _pad_last(v, d), _pad_last(out, d), lse, b, scale)
    return dq, dk, dv[..., :dv_size]


def merge(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-merges block results: ``out = sum_b exp(lse_b - lse) out_b``."""
    if len(outs) == 1:
        return outs[0], lses[0]
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    ct = lse.dtype
    out = sum(torch.exp(lse_b - safe)[..., None] * o.to(ct) for o, lse_b in zip(outs, lses))
    return out.to(outs[0].dtype), lse


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
