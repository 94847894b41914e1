"""One flash-attn varlen call for a packed chunk that has no K/V state prefix.

A standalone chunk packs whole sequences; each is a causal-square segment and no query
sees another segment's keys, which is exactly what ``flash_attn_varlen_func`` computes from
the segment borders (``cu_seqlens``, the same borders ``batch.materialize`` gives a chunk):

    rows        [a0 a1 a2 | b0 b1 | c0]          q/k/v [1, H, T, d]  ->  [T, H, d]
    cu_seqlens  [0,        3,      5,  6]        (int32), max_seqlen 3

One call covers every segment, and flash-attn's own autograd is exact: there is no block
to merge, so no log-sum-exp leaves the call. Dependent chunks (a state prefix) keep the
block path of :mod:`ds_chunkflow.attention` (LSE-merge). GQA is native (k/v keep their
KV heads); a sliding window is ``window_size=(window - 1, 0)`` (transformers' ``q - k <
window``); MLA's v is zero-padded to the q/k head dim and the padded output columns cut.

Supported flash-attn: 2.6 <= version < 2.9 (the public ``flash_attn_varlen_func`` with
``window_size`` and ``softcap``, checked when ds_chunkflow first imports it). Outside the
range, or with ``DS_CHUNKFLOW_FLASH_ATTN=0``, it is not used (a warning says which) and
packed chunks take the block path. Used only on CUDA, fp16 / bf16, without dropout.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, Sequence

import torch

SUPPORTED_FLASH_ATTN = ("2.6", "2.9")  # [lowest, first unsupported)
MAX_HEAD_DIM = 256


def cu_seqlens(lengths: Sequence[int], device=None) -> tuple[torch.Tensor, int]:
    """Segment lengths (in row order, tiling the chunk) -> ``(cu_seqlens int32 [S + 1], max_seqlen)``."""
    if not lengths or any(n <= 0 for n in lengths):
        raise ValueError(f"varlen segments need positive lengths, got {list(lengths)}")
    borders = [0]
    for n in lengths:
        borders.append(borders[-1] + n)
    return torch.tensor(borders, dtype=torch.int32, device=device), max(lengths)


def segment_lengths(starts_and_lengths: Sequence[tuple[int, int]], total: int) -> list[int]:
    """Checks that ``(start, length)`` segments tile rows ``[0, total)`` in order; returns the lengths."""
    row = 0
    for start, length in starts_and_lengths:
        if start != row:
            raise ValueError(f"segments must tile the chunk in order: one starts at row {start}, expected {row}")
        row += length
    if row != total:
        raise ValueError(f"segments cover {row} rows of a chunk of {total}")
    return [length for _, length in starts_and_lengths]


def pack(x: torch.Tensor) -> torch.Tensor:
    """``[1, H, T, d]`` (one chunk, heads first) -> ``[T, H, d]`` (flash-attn's varlen layout)."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one chunk [1, H, T, d], got {tuple(x.shape)}")
    return x[0].transpose(0, 1).contiguous()


def unpack(x: torch.Tensor) -> torch.Tensor:
    """``[T, H, d]`` -> ``[1, T, H, d]``: what a transformers attention function returns."""
    return x.unsqueeze(0)


def attention(fn: Callable, q, k, v, lengths: Sequence[int], scale: float, window: int | None) -> torch.Tensor:
    """Causal attention within each segment via one ``fn`` (flash-attn's varlen signature) call.

    ``q`` ``[1, H, T, dqk]``, ``k`` ``[1, Hkv, T, dqk]``, ``v`` ``[1, Hkv, T, dv]``; returns ``[1, T, H, dv]``.
    """
    dqk, dv = q.shape[-1], v.shape[-1]
    if dv > dqk:
        raise ValueError(f"varlen attention needs v head dim <= q/k head dim, got {dv} > {dqk}")
    cu, max_len = cu_seqlens(lengths, device=q.device)
    vp = v if dv == dqk else torch.nn.functional.pad(v, (0, dqk - dv))
    out = fn(pack(q), pack(k), pack(vp), cu, cu, max_len, max_len, dropout_p=0.0, softmax_scale=scale, causal=True,
             window_size=(-1, -1) if window is None else (window - 1, 0))
    return unpack(out[..., :dv])


def _version_ok(version: str) -> bool:
    from packaging.version import Version

    lo, hi = (Version(v) for v in SUPPORTED_FLASH_ATTN)
    return lo <= Version(version) < hi


def flash_attn_varlen_func() -> Callable | None:
    """flash-attn's public ``flash_attn_varlen_func`` if installed in the supported range and not
    turned off with ``DS_CHUNKFLOW_FLASH_ATTN=0``, else None."""
    if os.environ.get("DS_CHUNKFLOW_FLASH_ATTN", "1") == "0":
        return None
    return _import_flash_attn()


@functools.lru_cache(maxsize=None)
def _import_flash_attn() -> Callable | None:
    try:
        import flash_attn
    except ImportError:
        return None
    version = getattr(flash_attn, "__version__", "unknown")
    try:
        ok = _version_ok(version)
    except Exception:  # an unparsable version string
        ok = False
    if not ok:
        warnings.warn(f"flash-attn {version} is outside the supported range >={SUPPORTED_FLASH_ATTN[0]}, "
                      f"<{SUPPORTED_FLASH_ATTN[1]}: ds_chunkflow does not use it (PyTorch's fused kernels instead)",
                      stacklevel=3)
        return None
    return flash_attn.flash_attn_varlen_func


def varlen_fn_for(q: torch.Tensor, dropout: float) -> Callable | None:
    """The varlen function for a state-free packed chunk with these queries, or None (block path)."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or dropout > 0:
        return None
    if -(-q.shape[-1] // 8) * 8 > MAX_HEAD_DIM:
        return None
    return flash_attn_varlen_func()
