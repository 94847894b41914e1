"""Kernel dispatch (which kernel a block gets) and the fused-kernel plumbing, on CPU.

The CUDA ops cannot run here; they are exercised only through stand-ins with the same
interface (a math-kernel backend with the CUDA ops' quirks: head dims in multiples of 8,
a log-sum-exp padded to 32 rows) and through their meta kernels (argument plumbing and
shapes). ``tests/test_gpu.py`` runs the real ones (``pytest -m gpu``).
"""

import itertools
import warnings

import pytest
import torch

from ds_chunkflow.ops import kernels
from ds_chunkflow.ops.kernels import (
    BACKENDS,
    CPU_FLASH,
    CUDA_EFFICIENT,
    CUDA_FLASH,
    CUDA_FLASH_WINDOW,
    MATH,
    Block,
    Caps,
    FusedBackend,
    choose_kernel,
)
from ds_chunkflow.testing.families import build, exact_case
from ds_chunkflow.testing.models import build_tiny_model
from tests.helpers.exactness import chunked_errors
from tests.helpers.reference import make_sequences

BLOCKS = [Block(q, k, tq, tk, w, c) for q, k, tq, tk in [(0, 0, 5, 5), (8, 0, 5, 8), (8, 2, 4, 6), (3, 3, 1, 1),
                                                            (6, 0, 3, 7), (4, 4, 5, 5), (10, 3, 6, 7)]
          for w in (None, 2, 5, 8, 100) for c in (None, 30.0)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
CAPS = [Caps(f, e) for f in (False, True) for e in (False, True)]


def _mask(b: Block) -> torch.Tensor:
    """Brute-force visibility: key k visible to query q iff k <= q and q - k < window."""
    return torch.tensor([[k <= q and (b.window is None or q - k < b.window) for k in range(b.k_pos, b.k_pos + b.tk)]
                         for q in range(b.q_pos, b.q_pos + b.tq)])


@pytest.mark.parametrize("b", BLOCKS, ids=repr)
def test_fused_kernels_get_only_blocks_they_compute_exactly(b):
    """Every block sent to a fused kernel (any device, dtype, availability, head dim) has exactly the
    visibility the kernel's flag computes: all keys (is_causal False) or the lower triangle of a square
    (is_causal True); every other block goes to the math kernel with the window named as the reason."""
    mask = _mask(b)
    for dtype, dev, caps, hd in itertools.product(DTYPES, ("cpu", "cuda"), CAPS, (16, 192, 300)):
        choice = choose_kernel(b, dtype, dev, caps, 0.0, hd)
        if choice.kernel == MATH:
            if choice.case == "softcap":
                assert b.softcap is not None and "softcapping (30.0)" in choice.reason
            if choice.case == "window":
                assert not mask.all() and not (b.tq == b.tk and torch.equal(mask, torch.ones_like(mask).tril()))
                assert f"sliding window {b.window}" in choice.reason
            continue
        if choice.kernel == CUDA_FLASH_WINDOW:  # the live rows under FlashAttention's bottom-right local mask
            live = kernels.live_block(b)
            left, right = kernels.flash_window(live)
            i = torch.arange(live.tq)[:, None] + (b.tk - live.tq)
            j = torch.arange(b.tk)[None, :]
            want = torch.zeros_like(mask)
            want[live.q_pos - b.q_pos:][:live.tq] = (j <= i + right) & (j >= i - left)
            assert torch.equal(mask, want), (b, choice)
            continue
        assert b.softcap is None, (b, choice)  # no fused kernel takes a score function
        want = torch.ones_like(mask).tril() if b.is_causal else torch.ones_like(mask)
        assert b.tq == b.tk or not b.is_causal
        assert torch.equal(mask, want), (b, choice)


def _expected(dtype, dev, caps, dropout, hd, maskable, windowable=False, softcap=None):
    """The dispatch table of kernels.py, restated."""
    if dropout > 0:
        return MATH, "dropout"
    if softcap is not None:
        return MATH, "softcap"
    flash = dev == "cuda" and dtype in (torch.float16, torch.bfloat16) and caps.cuda_flash and hd <= 256
    if not maskable:
        return (CUDA_FLASH_WINDOW, None) if flash and windowable else (MATH, "window")
    if dev == "cpu":
        return CPU_FLASH, None
    if dev != "cuda":
        return MATH, "device"
    if dtype == torch.float64:
        return MATH, "float64"
    if dtype in (torch.float16, torch.bfloat16) and caps.cuda_flash and hd <= 256:
        return CUDA_FLASH, None
    if caps.cuda_efficient:
        return CUDA_EFFICIENT, None
    return MATH, "unavailable"


def test_dispatch_table_exhaustive():
    """Over blocks x dtypes x device types x kernel availability x dropout x head dims, the kernel is: CPU flash
    on CPU; on CUDA the aten flash op for fp16/bf16 (head dim <= 256 after padding to 8), else the memory-efficient
    op for fp16/bf16/fp32; a window-cut block on the windowed flash op under the same conditions as the flash op
    (when FlashAttention's local mask can express it); math for fp64 on CUDA, other devices, dropout, a logit
    softcap (any device), the other window-cut blocks or nothing available, each with its case named."""
    count = 0
    for b, dtype, dev, caps, dropout, hd in itertools.product(BLOCKS, DTYPES, ("cpu", "cuda", "mps"), CAPS,
                                                              (0.0, 0.1), (16, 60, 252, 253, 256, 300)):
        choice = choose_kernel(b, dtype, dev, caps, dropout, hd)
        padded = -(-hd // 8) * 8
        live = kernels.live_block(b)
        windowable = live is not None and kernels.flash_window(live) is not None
        want = _expected(dtype, dev, caps, dropout, padded, b.fully_visible or b.causal_square, windowable,
                         b.softcap)
        assert (choice.kernel, choice.case) == want, (b, dtype, dev, caps, dropout, hd, choice)
        assert (choice.reason is None) == (choice.kernel != MATH)
        count += 1
    assert count == len(BLOCKS) * 4 * 3 * 4 * 2 * 6


def test_math_fallback_warns_once_per_case(monkeypatch):
    """A block that lands on the math kernel warns, naming the case, once per (device type, case)."""
    monkeypatch.setattr(kernels, "_warned", set())
    q = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            kernels.block_forward(q, q, q, Block(0, 0, 6, 6, window=3), 0.3)
        kernels.block_forward(q, q, q, Block(0, 0, 6, 6), 0.3, dropout=0.2, seed=1)
        kernels.block_forward(q, q, q, Block(0, 0, 6, 6), 0.3)  # fused: no warning
        for _ in range(2):
            kernels.block_forward(q, q, q, Block(0, 0, 6, 6, softcap=50.0), 0.3)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3, messages
    assert "sliding window 3" in messages[0] and "dropout 0.2" in messages[1] and "softcapping (50.0)" in messages[2]


def _eager(q, k, v, vis, scale, softcap=None, sink=None):
    """transformers' eager attention (Gemma 2's softcap, GPT-OSS's sink column), with autograd."""
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~vis, float("-inf"))
    if sink is not None:
        s = torch.cat([s, sink.reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    return (p[..., :-1] if sink is not None else p) @ v


def _split_blocks(q_pos, tq, cuts, window, softcap):
    """Blocks of queries [q_pos, q_pos + tq) against keys [0, q_pos + tq) cut at ``cuts``, as the chunk
    attention splits a row's keys (state prefix pieces, then the causal square of its own keys)."""
    edges = [0, *cuts, q_pos, q_pos + tq]
    return [Block(q_pos, lo, tq, hi - lo, window, softcap) for lo, hi in zip(edges, edges[1:]) if hi > lo]


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("softcap,with_sink", [(None, True), (0.5, False), (0.5, True)])
def test_softcap_and_sink_over_blocks_equal_eager(window, softcap, with_sink):
    """Keys split into blocks (two prefix pieces and the causal square), each through the kernel dispatch (math
    for a softcap), merged by log-sum-exp, the sink folded in once: out equals transformers' eager attention, and
    the block backwards from the folded out / lse plus ``sink_grad`` give its dq, dk, dv and d sink (float64)."""
    g = torch.Generator().manual_seed(3)
    q_pos, tq, h, d, scale = 9, 5, 3, 8, 0.9
    q = torch.randn(1, h, tq, d, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(1, h, q_pos + tq, d, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    sink = (torch.rand(h, dtype=torch.float64, generator=g) * 3 - 1).requires_grad_() if with_sink else None
    blocks = _split_blocks(q_pos, tq, [4], window, softcap)
    vis = _mask(Block(q_pos, 0, tq, q_pos + tq, window))
    want = _eager(q, k, v, vis, scale, softcap, sink)
    dout = torch.randn(want.shape, dtype=torch.float64, generator=g)
    want.backward(dout)
    with torch.no_grad():
        keys = [slice(b.k_pos, b.k_pos + b.tk) for b in blocks]
        parts = [kernels.block_forward(q, k[:, :, s], v[:, :, s], b, scale) for b, s in zip(blocks, keys)]
        out, lse = kernels.merge([p[0] for p in parts], [p[1] for p in parts])
        if with_sink:
            out, lse = kernels.fold_sink(out, lse, sink)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-13)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for b, s in zip(blocks, keys):
            gq, gk, gv = kernels.block_backward(dout, q, k[:, :, s], v[:, :, s], out, lse, b, scale)
            dq += gq
            dk[:, :, s] += gk
            dv[:, :, s] += gv
        torch.testing.assert_close((dq, dk, dv), (q.grad, k.grad, v.grad), rtol=0, atol=1e-12)
        if with_sink:
            torch.testing.assert_close(kernels.sink_grad(dout, out, lse, sink), sink.grad, rtol=0, atol=1e-12)


def test_sink_folded_per_block_is_wrong():
    """Break check for the test above: folding the sink into each block before the merge (so it enters a row's
    denominator once per block) changes the output by far more than rounding."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(1, 2, 10, 8, dtype=torch.float64, generator=g) for _ in range(2))
    sink = torch.tensor([0.5, 1.5], dtype=torch.float64)
    blocks = _split_blocks(6, 4, [3], None, None)
    parts = [kernels.fold_sink(*kernels.block_forward(q, k[:, :, b.k_pos:b.k_pos + b.tk],
                                                      v[:, :, b.k_pos:b.k_pos + b.tk], b, 0.5), sink)
             for b in blocks]
    wrong, _ = kernels.merge([p[0] for p in parts], [p[1] for p in parts])
    assert (wrong - _eager(q, k, v, _mask(Block(6, 0, 4, 10)), 0.5, sink=sink)).abs().max() > 1e-2


# ----------------------------------------------------------------------------- stand-in backend
class StandIn:
    """The math kernel behind the CUDA ops' interface and quirks; counts calls and checks its inputs."""

    def __init__(self, head_align=8, lse_align=32):
        self.head_align, self.lse_align = head_align, lse_align
        self.forwards = self.backwards = 0

    def _block(self, q, k, is_causal):
        tq, tk = q.shape[2], k.shape[2]
        assert q.shape[-1] == k.shape[-1] and q.shape[-1] % self.head_align == 0, (q.shape, k.shape)
        assert not is_causal or tq == tk
        return Block(0, 0, tq, tk) if is_causal else Block(tk, 0, tq, tk)  # causal square / every key visible

    def forward(self, q, k, v, is_causal, scale):
        assert all(t.is_contiguous() for t in (q, k, v)) and v.shape[-1] == q.shape[-1]
        self.forwards += 1
        out, lse = kernels.math_forward(q, k, v, self._block(q, k, is_causal), scale)
        rows = -(-q.shape[2] // self.lse_align) * self.lse_align
        padded = torch.full((*lse.shape[:-1], rows), float("nan"), dtype=lse.dtype)  # junk rows must be cut
        padded[..., :q.shape[2]] = lse
        return out, padded

    def backward(self, dout, q, k, v, out, lse, is_causal, scale):
        assert lse.shape[-1] == -(-q.shape[2] // self.lse_align) * self.lse_align and lse.is_contiguous()
        assert all(t.is_contiguous() and t.shape[-1] == q.shape[-1] for t in (dout, k, v, out))
        self.backwards += 1
        return kernels.math_backward(dout, q, k, v, out, lse[..., :q.shape[2]], self._block(q, k, is_causal), scale)

    def backend(self):
        return FusedBackend(self.forward, self.backward, self.head_align, self.lse_align, contiguous=True)


def _chunked_vs_reference(model, lengths, chunk, keep):
    return chunked_errors(model, make_sequences(lengths, model.config.vocab_size), chunk, keep)

@pytest.mark.parametrize("case", ["llama head dim 12", "mistral_window", "deepseek_v3_mla", "gpt_oss"])
def test_stand_in_backend_trains_exactly(monkeypatch, case):
    """Through a backend with the CUDA ops' interface (head dims padded to 8, log-sum-exp padded to 32 rows with
    junk, contiguous inputs), chunked training equals the full-sequence reference in float64: the padding, the
    lse cut/re-pad, GQA row stacking and the merge are exact; the stand-in runs forward and backward (GPT-OSS:
    its backward gets the sink-folded out / lse)."""
    stand_in = StandIn()
    monkeypatch.setitem(BACKENDS, CPU_FLASH, stand_in.backend())
    if case == "llama head dim 12":
        model = build_tiny_model("llama", dtype=torch.float64, hidden_size=48)
        tol = 1e-10
    else:
        model_type, _, overrides, tol = exact_case(case)
        model = build(model_type, overrides)
    loss_err, grad_err = _chunked_vs_reference(model, [45, 11, 5, 1], chunk=8, keep=2)
    assert loss_err < tol and grad_err < tol, (loss_err, grad_err)
    assert stand_in.forwards > 0 and stand_in.backwards > 0


def test_stand_in_is_really_used(monkeypatch):
    """Break check for the stand-in path: a backend whose log-sum-exp is off by 0.5 makes the gradients wrong
    (so the stand-in test above would catch a merge that ignored the fused kernel's lse)."""
    stand_in = StandIn()

    def bad_forward(q, k, v, is_causal, scale):
        out, lse = stand_in.forward(q, k, v, is_causal, scale)
        return out, lse + 0.5

    monkeypatch.setitem(BACKENDS, CPU_FLASH, FusedBackend(bad_forward, stand_in.backward, 8, 32, True))
    model = build_tiny_model("llama", dtype=torch.float64)
    _, grad_err = _chunked_vs_reference(model, [45, 11], chunk=8, keep=1)
    assert grad_err > 1e-3


# ----------------------------------------------------------------------------- the real CUDA ops, meta kernels
@pytest.mark.parametrize("name,dtype", [(CUDA_FLASH, torch.bfloat16), (CUDA_EFFICIENT, torch.float32),
                                        (CUDA_EFFICIENT, torch.bfloat16)])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_ops_accept_our_arguments(name, dtype, causal):
    """The aten CUDA ops' schemas (via their meta kernels) take the arguments our wrappers pass, and the
    wrapped results have the shapes the merge needs: out [1, H, Tq, dv], lse [1, H, Tq], grads like q/k/v
    (MLA-like head dims 24 / 20 -> padded to 24)."""
    tq, tk = (10, 10) if causal else (10, 37)
    q = torch.empty(1, 4, tq, 24, dtype=dtype, device="meta")
    k = torch.empty(1, 4, tk, 24, dtype=dtype, device="meta")
    v = torch.empty(1, 4, tk, 20, dtype=dtype, device="meta")
    b = Block(0, 0, tq, tk) if causal else Block(tk, 0, tq, tk)
    assert b.is_causal == causal
    out, lse = kernels.fused_forward(BACKENDS[name], q, k, v, b, 0.2)
    assert out.shape == (1, 4, tq, 20) and lse.shape == (1, 4, tq) and lse.dtype == torch.float32
    dq, dk, dv = kernels.fused_backward(BACKENDS[name], torch.empty_like(out), q, k, v, out, lse, b, 0.2)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_cpu_flash_gqa_native_equals_expanded():
    """cpu_flash takes k/v with fewer heads (query head h -> k/v head h // n_rep): out, lse and dq equal the
    repeated-k/v kernel's, dk/dv its per-head sums; a block cut by a window (math kernel) is not taken natively."""
    g = torch.Generator().manual_seed(0)
    q, do = (torch.randn(1, 4, 6, 8, dtype=torch.float64, generator=g) for _ in range(2))
    k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64, generator=g) for _ in range(2))
    b = kernels.Block(0, 0, 6, 6)
    assert kernels.takes_gqa(q, v, b) and not kernels.takes_gqa(q, v, kernels.Block(0, 0, 6, 6, window=2))
    ke, ve = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    out, lse = kernels.block_forward(q, k, v, b, 0.3)
    ref_out, ref_lse = kernels.block_forward(q, ke, ve, b, 0.3)
    torch.testing.assert_close((out, lse), (ref_out, ref_lse), rtol=0, atol=1e-14)
    dq, dk, dv = kernels.block_backward(do, q, k, v, out, lse, b, 0.3)
    rq, rk, rv = kernels.block_backward(do, q, ke, ve, out, lse, b, 0.3)
    torch.testing.assert_close((dq, dk, dv), (rq, rk.view(1, 2, 2, 6, 8).sum(2), rv.view(1, 2, 2, 6, 8).sum(2)),
                               rtol=0, atol=1e-13)
