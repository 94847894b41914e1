"""One flash-attn varlen call for a packed chunk that has no K/V state prefix.

A standalone chunk packs whole sequences; each is a causal-square segment and no query
sees another segment's keys, which is exactly what ``flash_attn_varlen_func`` computes from
the segment borders (``cu_seqlens``, the same borders ``batch.materialize`` gives a chunk):

    rows        [a0 a1 a2 | b0 b1 | c0]          q/k/v [1, H, T, d]  ->  [T, H, d]
    cu_seqlens  [0,        3,      5,  6]        (int32), max_seqlen 3

One call covers every segment, and flash-attn's own autograd is exact: there is no block
to merge, so no log-sum-exp leaves the call. Dependent chunks (a state prefix) keep the
block path of :mod:`ds_chunkflow.ops.attention` (LSE-merge). GQA is native (k/v keep their
KV heads); a sliding window is ``window_size=(window - 1, 0)`` (transformers' ``q - k <
window``); Gemma 2's attention logit softcap is flash-attn's ``softcap`` (GPT-OSS's attention
sinks are not taken by the varlen function: such chunks keep the block path); flash-attn 2 takes
one head dim for q, k and v, so the smaller side is zero-padded to the larger (MLA: v 128 -> qk
192; or q/k -> v: zero columns add nothing to a score, the scale is passed explicitly) and the
padded output columns cut.

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


def attention(fn: Callable, q, k, v, lengths: Sequence[int], scale: float, window: int | None,
              softcap: float | None = None) -> torch.Tensor:
    """Causal attention within each segment via one ``fn`` (flash-attn's varlen signature) call.

    ``q`` ``[1, H, T, dqk]``, ``k`` ``[1, Hkv, T, dqk]``, ``v`` ``[1, Hkv, T, dv]``; returns ``[1, T, H, dv]``.
    ``softcap`` (Gemma 2): flash-attn's ``softcap``, ``tanh(scale * q.k / softcap) * softcap`` (0: none).
    """
    dv, d = v.shape[-1], max(q.shape[-1], v.shape[-1])
    cu, max_len = cu_seqlens(lengths, device=q.device)
    qp, kp, vp = (t if t.shape[-1] == d else torch.nn.functional.pad(t, (0, d - t.shape[-1])) for t in (q, k, v))
    out = fn(pack(qp), pack(kp), pack(vp), cu, cu, max_len, max_len, dropout_p=0.0, softmax_scale=scale,
             causal=True, window_size=(-1, -1) if window is None else (window - 1, 0),
             softcap=0.0 if softcap is None else float(softcap))
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
    except ModuleNotFoundError as e:
        if e.name != "flash_attn":  # installed, but something it imports is missing
            _warn_unusable(e)
        return None
    except Exception as e:  # noqa: BLE001  built against another torch / CUDA: OSError, undefined symbols, ...
        _warn_unusable(e)
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


def _warn_unusable(e: BaseException) -> None:
    warnings.warn(f"flash-attn is installed but cannot be imported ({type(e).__name__}: {e}); ds_chunkflow does not "
                  "use it (PyTorch's fused kernels instead). A flash-attn built against another torch fails so: "
                  "install a wheel built for this torch / CUDA / Python", stacklevel=4)


def varlen_fn_for(q: torch.Tensor, dropout: float, head_dim: int | None = None) -> Callable | None:
    """The varlen function for a state-free packed chunk with these queries, or None (block path).
    ``head_dim``: the larger of the q/k and v head dims (default q's)."""
    if not usable(q.device.type, q.dtype, dropout, head_dim or q.shape[-1]):
        return None
    return flash_attn_varlen_func()


def usable(device_type: str, dtype: torch.dtype, dropout: float, head_dim: int) -> bool:
    """Pure: whether a chunk with these properties may take flash-attn (CUDA, fp16 / bf16, no dropout, the
    larger head dim padded to 8 at most 256)."""
    return (device_type == "cuda" and dtype in (torch.float16, torch.bfloat16) and dropout == 0
            and -(-head_dim // 8) * 8 <= MAX_HEAD_DIM)
