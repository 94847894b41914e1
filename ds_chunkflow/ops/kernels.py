"""Attention kernels with an explicit log-sum-exp, so blocks of keys can be merged.

Every kernel works on one *block*: queries at sequence positions ``[qp, qp + Tq)``
against keys at ``[kp, kp + Tk)`` (tensors ``[1, H, T, d]``; k/v expanded to q's heads for GQA,
except for a kernel that takes fewer k/v heads itself, :func:`takes_gqa`),
with causal visibility by position (``k <= q``) and an optional sliding window
(``q - k < window``, transformers' convention). ``forward`` returns ``(out, lse)``;
``backward`` takes the *merged* ``out``/``lse`` of all blocks of a query row, which is
what makes block-wise gradients exact (ring-attention identity: ``D = rowsum(dO * O)``
and ``P = exp(S - lse)`` only need the merged row statistics).

Which kernel a block gets is one pure function, :func:`choose_kernel`:

    block                         cpu          cuda fp16/bf16          cuda fp32        cuda fp64
    fully visible / causal-square cpu_flash    cuda_flash (else eff.)  cuda_efficient   math (+warning)
    cut by a sliding window       math (+w.)   cuda_flash_window       math (+warning)  math (+warning)
    attention dropout > 0         math (+warning, any device)
    logit softcapping (Gemma 2)   math (+warning, any device)

* ``cpu_flash``: PyTorch's fused CPU flash-attention op (fp64/fp32/bf16/fp16); GQA native (query
  head h reads k/v head ``h // (H / Hkv)``, as transformers' ``repeat_kv``; dk/dv come back per k/v
  head), so k/v are neither repeated nor their gradients summed;
* ``cuda_flash`` / ``cuda_efficient``: PyTorch's own fused CUDA SDPA ops that return the
  log-sum-exp (``aten._scaled_dot_product_flash_attention`` / ``_efficient_attention`` and
  their ``_backward``); no flash-attn package needed. Head dims are zero-padded to a
  multiple of 8 (exact: zero columns add nothing to a score, padded output columns are
  cut off); the efficient kernel's log-sum-exp is padded to a multiple of 32 rows, cut
  for the merge and padded back for its backward;
* ``cuda_flash_window``: ``aten._flash_attention_forward`` / ``_backward`` (FlashAttention-2, the op behind
  the SDPA flash op) with ``window_size_left/right``, for a block cut by a sliding window. Its mask is
  aligned to the bottom-right corner of the block: query row i sees key column j iff
  ``i + (Tk - Tq) - left <= j <= i + (Tk - Tq) + right``. Ours is ``0 <= q - k < window`` by position, so
  (worked example: queries at 8..11, keys at 2..7, window 5 -> right 4, left 0)::

      right = (q_pos + Tq) - (k_pos + Tk)        the last query's lead over the last key
      left  = window - 1 - right

  both >= 0. Only the block's *live* rows go to the kernel (:func:`live_block`: the query rows that see
  at least one key), which keeps ``left >= 0``: a prefix block of a segment longer than the window
  has rows past the window's reach (right = Tq > window - 1), which see nothing and get out 0, lse
  -inf without a kernel call (worked example: queries 10..17, prefix keys 6..9, window 5: rows
  10..13 are live, right 4, left 0). A row the kernel finds empty gets lse +inf from it (not -inf),
  mapped to -inf for the merge;
* ``math``: explicit scores in fp32 (fp64 for fp64): any mask, window, dropout and logit softcap
  (``s = tanh(s / cap) * cap`` on the scaled scores, before the mask, as transformers' eager attention;
  its backward multiplies ``dS`` by ``1 - tanh^2``); it
  materialises ``[H, Tq, Tk]`` scores, so every case that lands here on a non-CPU device
  is named in a warning (once per case and device type).

Dropout stays on the math kernel: its mask is drawn from a per-(step seed, block)
generator, which a recomputed forward and the backward replay exactly; the fused ops'
philox state cannot be replayed per block. The CUDA ops have not run on a GPU here: on CPU,
``tests/ops/test_cuda_contracts.py`` calls them through stand-ins registered for their aten names
that assert what the CUDA kernels assume (layouts, windows, lse conventions);
``tests/test_gpu.py`` (``pytest -m gpu``, run by ``scripts/gpu_check.sh``) checks the real ones.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ds_chunkflow.ops import fused_ops


@dataclass(frozen=True)
class Block:
    """Positions of a query block and a key block, plus the masking they need."""

    q_pos: int
    k_pos: int
    tq: int
    tk: int
    window: int | None = None
    softcap: float | None = None  # scores -> tanh(scores / softcap) * softcap, before the mask

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

    @property
    def is_causal(self) -> bool:
        """What a fused kernel's ``is_causal`` flag must be (a 1x1 square is fully visible)."""
        return self.causal_square and not self.fully_visible


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
    """``(P, lse, tanh)``: probabilities, row log-sum-exp and, with a softcap, ``tanh(scores / cap)`` (its
    derivative is what the backward needs), else None."""
    ct = _compute_dtype(q)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    t = None
    if b.softcap is not None:
        t = torch.tanh(s / b.softcap)
        s = t * b.softcap
    s = s.masked_fill(~_visible(b, q.device), float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(s - safe.to(ct)[..., None]), lse, t


def math_forward(q, k, v, b: Block, scale: float, dropout: float = 0.0, seed: int = 0):
    p, lse, _ = _math_probs(q, k, b, scale)
    if dropout > 0:
        p = p * _keep_mask(p.shape, dropout, seed, b, q.device) / (1 - dropout)
    out = torch.matmul(p, v.to(p.dtype))
    return out.to(q.dtype), lse.float() if q.dtype != torch.float64 else lse


def math_backward(dout, q, k, v, out, lse, b: Block, scale: float, dropout: float = 0.0, seed: int = 0):
    ct = _compute_dtype(q)
    p, _, t = _math_probs(q, k, b, scale, lse=lse.to(ct))
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
    if t is not None:  # d(tanh(s / c) * c) / ds = 1 - tanh^2
        ds = ds * (1 - t * t)
    dq = torch.matmul(ds, k.to(ct)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(ct)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------- fused backends
@dataclass(frozen=True)
class FusedBackend:
    """A fused kernel: ``forward(q, k, v, mask, scale) -> (out, lse)`` and
    ``backward(dout, q, k, v, out, lse, mask, scale) -> (dq, dk, dv)`` (``mask``: ``mask(block)``, the
    ``is_causal`` flag unless the backend says otherwise), on tensors with
    one head dim (a multiple of ``head_align``); its lse has ``round_up(Tq, lse_align)`` rows."""

    forward: Callable
    backward: Callable
    head_align: int = 1
    lse_align: int = 1
    contiguous: bool = False  # make every input contiguous first (the CUDA ops want stride 1 rows)
    native_gqa: bool = False  # takes k/v with fewer heads than q (query head h -> k/v head h // n_rep)
    mask: Callable = lambda b: b.is_causal  # what the kernel's mask argument is for block b (a flag, a window)


def live_block(b: Block) -> Block | None:
    """The rows of ``b`` whose queries see at least one key (a contiguous run), as a block; None if none do.

    Query position q sees a key iff ``k_pos <= q`` and ``q - (k_pos + tk - 1) < window``."""
    lo = max(0, b.k_pos - b.q_pos)
    hi = b.tq if b.window is None else min(b.tq, b.k_pos + b.tk - 1 + b.window - b.q_pos)
    if hi <= lo:
        return None
    return b if (lo, hi) == (0, b.tq) else dataclasses.replace(b, q_pos=b.q_pos + lo, tq=hi - lo)


def flash_window(b: Block) -> tuple[int, int] | None:
    """``(window_size_left, window_size_right)`` of FlashAttention's bottom-right-aligned local mask that
    equals block ``b``'s visibility, or None where none does (see the module docstring)."""
    if b.window is None:
        return None
    right = (b.q_pos + b.tq) - (b.k_pos + b.tk)
    left = b.window - 1 - right
    # mha_fwd drops a bound >= Tk (sets it to -1): harmless for left (it cannot bind then), but the right
    # bound still binds row 0 while right < Tq - 1 (keys after some queries): no such window then
    if left < 0 or right < 0 or b.tk <= right < b.tq - 1:
        return None
    return left, right


MATH, CPU_FLASH, CUDA_FLASH, CUDA_EFFICIENT = "math", "cpu_flash", "cuda_flash", "cuda_efficient"
CUDA_FLASH_WINDOW = "cuda_flash_window"
# On ROCm the efficient kernel's lse is not padded (see torch/_meta_registrations.py).
_EFFICIENT_LSE_ALIGN = 1 if torch.version.hip else 32
BACKENDS: dict[str, FusedBackend] = {
    CPU_FLASH: FusedBackend(fused_ops.cpu_flash_forward, fused_ops.cpu_flash_backward, native_gqa=True),
    CUDA_FLASH: FusedBackend(fused_ops.cuda_flash_forward, fused_ops.cuda_flash_backward, head_align=8,
                             contiguous=True),
    CUDA_EFFICIENT: FusedBackend(fused_ops.cuda_efficient_forward, fused_ops.cuda_efficient_backward, head_align=8,
                                 lse_align=_EFFICIENT_LSE_ALIGN, contiguous=True),
    CUDA_FLASH_WINDOW: FusedBackend(fused_ops.cuda_flash_window_forward, fused_ops.cuda_flash_window_backward,
                                    head_align=8, contiguous=True, mask=flash_window),
}
FLASH_MAX_HEAD_DIM = 256  # aten flash (FlashAttention-2) head dims


# ----------------------------------------------------------------------------- dispatch
@dataclass(frozen=True)
class Caps:
    """The fused CUDA kernels this device offers (see :func:`cuda_caps`)."""

    cuda_flash: bool = False
    cuda_efficient: bool = False


@dataclass(frozen=True)
class Choice:
    """The kernel of one block; for ``math``, the case (a short key) and why, for the warning."""

    kernel: str
    case: str | None = None
    reason: str | None = None


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def choose_kernel(b: Block, dtype: torch.dtype, device_type: str, caps: Caps, dropout: float = 0.0,
                  head_dim: int = 64) -> Choice:
    """Pure dispatch: the fastest kernel that computes block ``b`` exactly (``head_dim``: the
    larger of the q/k and v head dims)."""
    if dropout > 0:
        return Choice(MATH, "dropout", f"attention dropout {dropout}: the fused kernels' dropout RNG cannot be "
                                       "replayed per block for recompute")
    if b.softcap is not None:
        return Choice(MATH, "softcap", f"attention logit softcapping ({b.softcap}): the fused kernels take no "
                                       "score function")
    half = dtype in (torch.float16, torch.bfloat16)
    flash = device_type == "cuda" and half and caps.cuda_flash and _round_up(head_dim, 8) <= FLASH_MAX_HEAD_DIM
    if not (b.fully_visible or b.causal_square):
        live = live_block(b)
        if flash and live is not None and flash_window(live) is not None:
            return Choice(CUDA_FLASH_WINDOW)
        return Choice(MATH, "window", f"sliding window {b.window} cuts a block of {b.tq} queries x {b.tk} keys "
                                      "(neither fully visible nor causal-square; windowed fused kernel: CUDA "
                                      "fp16/bf16 with flash attention only)")
    if device_type == "cpu":
        return Choice(CPU_FLASH)
    if device_type != "cuda":
        return Choice(MATH, "device", f"no fused attention kernel with log-sum-exp on device type {device_type!r}")
    if dtype == torch.float64:
        return Choice(MATH, "float64", "float64 on CUDA: the fused SDPA kernels take fp16 / bf16 / fp32")
    if flash:
        return Choice(CUDA_FLASH)
    if (half or dtype == torch.float32) and caps.cuda_efficient:
        return Choice(CUDA_EFFICIENT)
    return Choice(MATH, "unavailable", f"no fused SDPA kernel for {dtype}, head dim {head_dim} here "
                                       f"(flash: {caps.cuda_flash}, memory-efficient: {caps.cuda_efficient})")


_cuda_capability: dict[int, tuple[int, int]] = {}


def cuda_caps(device: torch.device) -> Caps:
    """What this GPU and torch build offer, honouring ``torch.backends.cuda.enable_*_sdp`` (and
    ``torch.nn.attention.sdpa_kernel``), which is how a caller turns a kernel off."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _cuda_capability:
        _cuda_capability[index] = torch.cuda.get_device_capability(index)
    major = _cuda_capability[index][0]
    cuda = torch.backends.cuda
    flash = cuda.is_flash_attention_available() and major >= 8 and cuda.flash_sdp_enabled()
    return Caps(cuda_flash=flash, cuda_efficient=major >= 5 and cuda.mem_efficient_sdp_enabled())


_warned: set[tuple[str, str]] = set()


def _choose(q, v, b: Block, dropout: float) -> Choice:
    caps = cuda_caps(q.device) if q.device.type == "cuda" else Caps()
    choice = choose_kernel(b, q.dtype, q.device.type, caps, dropout, max(q.shape[-1], v.shape[-1]))
    key = (q.device.type, choice.case)
    if choice.kernel == MATH and key not in _warned:
        _warned.add(key)
        warnings.warn(f"ds_chunkflow attention on {q.device.type}: math kernel (scores materialised, "
                      f"memory ~ queries x keys per head) because {choice.reason}", stacklevel=3)
    return choice


def _pad_last(t: torch.Tensor, size: int) -> torch.Tensor:
    return t if t.shape[-1] == size else torch.nn.functional.pad(t, (0, size - t.shape[-1]))


def _prepare(backend: FusedBackend, q, v, *tensors):
    """Zero-pads the head dim of ``tensors`` to one size: the larger of q's and v's (MLA: v 128 ->
    qk 192), rounded up to the backend's alignment (the CUDA ops: a multiple of 8)."""
    d = _round_up(max(q.shape[-1], v.shape[-1]), backend.head_align)
    out = [_pad_last(t, d) for t in tensors]
    return [t.contiguous() for t in out] if backend.contiguous else out


def _live_rows(b: Block) -> tuple[Block, slice]:
    """The live block of ``b`` (see :func:`live_block`) and its rows within ``b``; for a fully visible or
    causal-square block, ``b`` itself and all rows."""
    live = live_block(b)
    assert live is not None, f"a fused kernel got a block in which no query sees a key: {b}"
    return live, slice(live.q_pos - b.q_pos, live.q_pos - b.q_pos + live.tq)


def _scatter_rows(part: torch.Tensor, rows: slice, total: int, fill: float) -> torch.Tensor:
    if part.shape[2] == total:
        return part
    full = part.new_full((*part.shape[:2], total, *part.shape[3:]), fill)
    full[:, :, rows] = part
    return full


def fused_forward(backend: FusedBackend, q, k, v, b: Block, scale: float):
    """``(out [.., Tq, dv], lse [.., Tq])`` of block ``b`` through ``backend`` (padding in, padding cut; rows
    that see no key: out 0, lse -inf, not sent)."""
    live, rows = _live_rows(b)
    qp, kp, vp = _prepare(backend, q, v, q[:, :, rows], k, v)
    out, lse = backend.forward(qp, kp, vp, backend.mask(live), scale)
    out, lse = out[..., :v.shape[-1]], lse[..., :live.tq]
    return _scatter_rows(out, rows, b.tq, 0.0), _scatter_rows(lse, rows, b.tq, -math.inf)


def fused_backward(backend: FusedBackend, dout, q, k, v, out, lse, b: Block, scale: float):
    """``(dq, dk, dv)`` of block ``b`` from the merged ``out`` / ``lse`` through ``backend``."""
    live, rows = _live_rows(b)
    qp, kp, vp, dop, op = _prepare(backend, q, v, q[:, :, rows], k, v, dout[:, :, rows], out[:, :, rows])
    lse = _pad_last(lse[:, :, rows], _round_up(live.tq, backend.lse_align)).contiguous()
    dq, dk, dv = backend.backward(dop, qp, kp, vp, op, lse, backend.mask(live), scale)
    return _scatter_rows(dq[..., :q.shape[-1]], rows, b.tq, 0.0), dk[..., :k.shape[-1]], dv[..., :v.shape[-1]]


def takes_gqa(q, v, b: Block, dropout: float = 0.0) -> bool:
    """Whether block ``b`` runs on a kernel that takes k/v with fewer heads than q (no repeat, no reduce)."""
    choice = _choose(q, v, b, dropout)
    return choice.kernel != MATH and BACKENDS[choice.kernel].native_gqa


def block_forward(q, k, v, b: Block, scale: float, dropout: float = 0.0, seed: int = 0):
    """Dispatches one block to the fastest kernel that expresses it exactly."""
    choice = _choose(q, v, b, dropout)
    if choice.kernel == MATH:
        return math_forward(q, k, v, b, scale, dropout, seed)
    return fused_forward(BACKENDS[choice.kernel], q, k, v, b, scale)


def block_backward(dout, q, k, v, out, lse, b: Block, scale: float, dropout: float = 0.0, seed: int = 0):
    choice = _choose(q, v, b, dropout)
    if choice.kernel == MATH:
        return math_backward(dout, q, k, v, out, lse, b, scale, dropout, seed)
    return fused_backward(BACKENDS[choice.kernel], dout, q, k, v, out, lse, b, scale)


def merge(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-merges block results: ``out = sum_b exp(lse_b - lse) out_b``."""
    if len(outs) == 1:
        return outs[0], lses[0]
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    ct = lse.dtype
    out = sum(torch.exp(lse_b - safe)[..., None] * o.to(ct) for o, lse_b in zip(outs, lses))
    return out.to(outs[0].dtype), lse


def fold_sink(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adds one logit per head, ``sink [H]``, with a zero value vector, to every row's softmax (GPT-OSS's
    attention sinks): ``lse' = logaddexp(lse, sink_h)``, ``out' = out * exp(lse - lse')``.

    Applied once to the *merged* result of all blocks of a row, so the sink enters each query's denominator
    exactly once however its keys were split. The blocks' backward then takes ``out'`` / ``lse'``: the sink
    is one more key whose value is 0, so ``P = exp(S - lse')`` and ``D = rowsum(dO * out')`` stay exact."""
    s = sink.detach().to(lse.dtype)[None, :, None]
    folded = torch.logaddexp(lse, s)
    return (out.to(lse.dtype) * torch.exp(lse - folded)[..., None]).to(out.dtype), folded


def sink_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """d loss / d sink ``[H]`` from the folded ``out`` / ``lse`` of :func:`fold_sink`: the sink's probability
    is ``exp(sink_h - lse')`` and its value 0, so its score gradient is ``-P_sink * rowsum(dO * out')``."""
    ct = lse.dtype
    delta = (dout.to(ct) * out.to(ct)).sum(-1)
    return -(torch.exp(sink.detach().to(ct)[None, :, None] - lse) * delta).sum((0, 2)).to(sink.dtype)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
