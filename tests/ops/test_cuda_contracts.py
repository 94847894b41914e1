"""The CUDA attention path against the contracts of the CUDA kernels, on CPU (no GPU needed).

The aten CUDA ops have no CPU kernels; here each gets a CPU stand-in registered through
``torch.library`` under its own aten name, so ``kernels.py`` calls exactly what it calls on
a GPU. A stand-in asserts what the CUDA kernel assumes about its arguments and computes the
reference with the kernel's own semantics:

    op                                          assumes / does (the CUDA kernel)
    _scaled_dot_product_flash_attention(_bwd)   head dim % 8, stride-1 rows; causal is bottom-right
    _scaled_dot_product_efficient_attention     lse padded to 32 rows (junk in the pad)
    ..._efficient_attention_backward            out's row stride = num_heads * head_dim (o_strideM(),
                                                kernel_backward.h): [B, M, H, d] memory viewed [B, H, M, d]
    _flash_attention_forward / _backward        [B, M, H, d]; window_size_left/right, bottom-right aligned:
                                                row i sees col j iff i+Tk-Tq-left <= j <= i+Tk-Tq+right
                                                (-1: unbounded; >= Tk clamped to -1; is_causal -> right 0);
                                                a row that sees no key: lse +inf, out 0

Dispatch is forced to the CUDA table (``choose_kernel`` with device type "cuda" and chosen
capabilities). Model-level runs are in float64 presented to the table as bf16 / fp32, so the
whole CUDA code path (padding, transposes, layouts, windows, lse handling, merge) is checked
against the float64 reference to rounding.

Also here, the contracts of the CUDA-only paths that need no op stand-in: flash-attn varlen
under sequence parallelism (2 gloo ranks, a varlen stand-in: the output is this rank's rows
with all heads, ``[1, T/P, H, d]``, and exact).
"""

import contextlib
import math

import pytest
import torch

from ds_chunkflow.ops import fused_ops, kernels
from ds_chunkflow.ops.kernels import CUDA_EFFICIENT, CUDA_FLASH, CUDA_FLASH_WINDOW, MATH, Block, Caps
from ds_chunkflow.testing.families import build, exact_case
from ds_chunkflow.testing.models import build_tiny_model
from tests.helpers.exactness import chunked_errors
from tests.helpers.reference import make_sequences


# ----------------------------------------------------------------------------- reference attention
def _visible(tq, tk, left, right):
    """FlashAttention-2's local mask (bottom-right aligned); left/right -1: unbounded."""
    i = torch.arange(tq)[:, None] + (tk - tq)
    j = torch.arange(tk)[None, :]
    vis = torch.ones(tq, tk, dtype=torch.bool)
    if right >= 0:
        vis &= j <= i + right
    if left >= 0:
        vis &= j >= i - left
    return vis


def _ct(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _attend(q, k, v, vis, scale):
    """q/k/v ``[B, H, M, d]`` -> out (q's dtype), lse (+inf for a row that sees nothing, as FA2 writes it)."""
    ct = _ct(q)
    s = (q.to(ct) @ k.to(ct).transpose(-1, -2) * scale).masked_fill(~vis, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    lse = lse.masked_fill(lse == -math.inf, math.inf)
    return (p @ v.to(ct)).to(q.dtype), lse if ct == torch.float64 else lse.float()


def _attend_backward(do, q, k, v, out, lse, vis, scale):
    ct = _ct(q)
    s = (q.to(ct) @ k.to(ct).transpose(-1, -2) * scale).masked_fill(~vis, -math.inf)
    lse = lse.to(ct)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None]).masked_fill(~vis, 0.0)
    do, o = do.to(ct), out.to(ct)
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ v.to(ct).transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    return ((ds @ k.to(ct)) * scale).to(q.dtype), ((ds.transpose(-1, -2) @ q.to(ct)) * scale).to(k.dtype), \
        dv.to(v.dtype)


def _check_inputs(*ts, heads=1):
    d = ts[0].shape[-1]
    for t in ts:
        assert t.stride(-1) == 1, f"the CUDA kernels need stride-1 rows, got strides {t.stride()}"
        assert t.shape[-1] == d and d % 8 == 0, f"head dims must be equal multiples of 8, got {t.shape}"
    assert ts[0].shape[heads] == ts[1].shape[heads], "CUDA backends get k/v expanded to q's heads"


def _rows_major_view(x):
    """``[B, M, H, d]``-contiguous memory, viewed as ``[B, H, M, d]``: what the SDPA CUDA ops return."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


# ----------------------------------------------------------------------------- CPU stand-ins of the CUDA ops
class StandIns:
    """Registers the stand-ins; counts calls per op."""

    def __init__(self):
        self.calls = {}

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def sdpa_flash(self, q, k, v, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
        self._count("flash")
        _check_inputs(q, k, v)
        out, lse = _attend(q, k, v, _visible(q.shape[2], k.shape[2], -1, 0 if is_causal else -1), scale)
        e = q.new_empty(0)
        return _rows_major_view(out), lse, e, e, q.shape[2], k.shape[2], e, e, e

    def sdpa_flash_backward(self, do, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, seed,
                            offset, *, scale=None):
        self._count("flash_backward")
        _check_inputs(q, k, v, out, do)
        assert lse.shape == q.shape[:3], (lse.shape, q.shape)
        vis = _visible(q.shape[2], k.shape[2], -1, 0 if is_causal else -1)
        return _attend_backward(do, q, k, v, out, lse, vis, scale)

    def sdpa_efficient(self, q, k, v, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *,
                       scale=None):
        self._count("efficient")
        _check_inputs(q, k, v)
        tq, tk = q.shape[2], k.shape[2]
        vis = torch.ones(tq, tk, dtype=torch.bool).tril() if is_causal else torch.ones(tq, tk, dtype=torch.bool)
        out, lse = _attend(q, k, v, vis, scale)  # causal from the top left (the SDPA op's mask type)
        padded = torch.full((*lse.shape[:-1], -(-tq // 32) * 32), math.nan, dtype=lse.dtype)  # junk pad rows
        padded[..., :tq] = lse
        e = torch.empty((), dtype=torch.int64)
        return _rows_major_view(out), padded, e, e

    def sdpa_efficient_backward(self, do, q, k, v, bias, out, lse, seed, offset, dropout_p, grad_input_mask,
                                is_causal=False, *, scale=None):
        self._count("efficient_backward")
        _check_inputs(q, k, v, out)
        b, h, m, d = out.shape
        # the kernel reads out at batch * stride(0) + head * stride(1) + row * (h * d): o_strideM() is hard-coded
        assert out.stride(3) == 1 and (m == 1 or out.stride(2) == h * d), (
            f"memory-efficient backward: out [B, H, M, d] = {tuple(out.shape)} with strides {out.stride()}; the "
            f"CUDA kernel reads row r at r * num_heads * head_dim = r * {h * d} (o_strideM), so out must be "
            f"[B, M, H, d] memory viewed as [B, H, M, d] (strides (*, *, {h * d}, 1))")
        assert lse.shape[-1] == -(-q.shape[2] // 32) * 32 and lse.is_contiguous()
        tq, tk = q.shape[2], k.shape[2]
        vis = torch.ones(tq, tk, dtype=torch.bool).tril() if is_causal else torch.ones(tq, tk, dtype=torch.bool)
        dq, dk, dv = _attend_backward(do, q, k, v, out, lse[..., :tq], vis, scale)
        return dq, dk, dv, q.new_empty(0)

    @staticmethod
    def _window(tk, is_causal, left, right):
        left, right = (-1 if w is None else w for w in (left, right))
        left, right = (-1 if w >= tk else w for w in (left, right))  # mha_fwd's clamps
        return (left, 0) if is_causal else (left, right)

    def flash_forward(self, q, k, v, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *,
                      scale=None, window_size_left=None, window_size_right=None, seqused_k=None, alibi_slopes=None,
                      block_table=None, num_splits=None):
        self._count("flash_window")
        assert cum_q is None and cum_k is None and dropout_p == 0.0
        _check_inputs(q, k, v, heads=2)  # [B, M, H, d]
        left, right = self._window(k.shape[1], is_causal, window_size_left, window_size_right)
        out, lse = _attend(*(t.transpose(1, 2) for t in (q, k, v)), _visible(q.shape[1], k.shape[1], left, right),
                           scale)
        e = q.new_empty(0)
        return out.transpose(1, 2).contiguous(), lse, e, e, e

    def flash_backward(self, do, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, seed, offset,
                       *, scale=None, window_size_left=None, window_size_right=None):
        self._count("flash_window_backward")
        _check_inputs(q, k, v, out, do, heads=2)
        assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]), (lse.shape, q.shape)
        left, right = self._window(k.shape[1], is_causal, window_size_left, window_size_right)
        grads = _attend_backward(*(t.transpose(1, 2) for t in (do, q, k, v, out)), lse,
                                 _visible(q.shape[1], k.shape[1], left, right), scale)
        return tuple(g.transpose(1, 2) for g in grads)

    @contextlib.contextmanager
    def registered(self):
        lib = torch.library.Library("aten", "IMPL")
        for name, fn in [("_scaled_dot_product_flash_attention", self.sdpa_flash),
                         ("_scaled_dot_product_flash_attention_backward", self.sdpa_flash_backward),
                         ("_scaled_dot_product_efficient_attention", self.sdpa_efficient),
                         ("_scaled_dot_product_efficient_attention_backward", self.sdpa_efficient_backward),
                         ("_flash_attention_forward", self.flash_forward),
                         ("_flash_attention_backward", self.flash_backward)]:
            lib.impl(name, fn, "CPU")
        try:
            yield self
        finally:
            lib._destroy()


@pytest.fixture
def cuda_ops():
    with StandIns().registered() as ops:
        yield ops


@contextlib.contextmanager
def cuda_dispatch(monkeypatch, caps: Caps, float64_as=None):
    """``choose_kernel`` answers as on a CUDA device with ``caps`` (float64 tensors presented as ``float64_as``);
    yields the list of kernels chosen."""
    choose, used = kernels.choose_kernel, []

    def on_cuda(b, dtype, device_type, _caps, dropout=0.0, head_dim=64):
        if dtype == torch.float64 and float64_as is not None:
            dtype = float64_as
        choice = choose(b, dtype, "cuda", caps, dropout, head_dim)
        used.append(choice.kernel)
        return choice

    monkeypatch.setattr(kernels, "choose_kernel", on_cuda)
    monkeypatch.setattr(kernels, "_warned", set())
    yield used


# ----------------------------------------------------------------------------- defect 1: efficient backward layout
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_efficient_backward_gets_out_in_the_layout_the_kernel_reads(cuda_ops, monkeypatch, dtype, causal):
    """The memory-efficient backward gets ``out`` with row stride num_heads * head_dim (the CUDA kernel's
    hard-coded o_strideM), whatever layout the merged ``out`` has; gradients equal the math kernel's."""
    g = torch.Generator().manual_seed(0)
    q, do = (torch.randn(1, 3, 40, 20, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(1, 3, 40 if causal else 23, 20, generator=g).to(dtype) for _ in range(2))
    b = Block(0, 0, 40, 40) if causal else Block(23, 0, 40, 23)
    with cuda_dispatch(monkeypatch, Caps(cuda_flash=False, cuda_efficient=True)) as used:
        out, lse = kernels.block_forward(q, k, v, b, 0.3)
        out = out.contiguous()  # the merge hands the backward a fresh [B, H, M, d]-contiguous tensor
        grads = kernels.block_backward(do, q, k, v, out, lse, b, 0.3)
    assert set(used) == {CUDA_EFFICIENT} and cuda_ops.calls["efficient_backward"] == 1
    ref_out, ref_lse = kernels.math_forward(q, k, v, b, 0.3)
    ref = kernels.math_backward(do, q, k, v, ref_out, ref_lse, b, 0.3)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(grads, ref, **tol)


def test_rows_major_is_a_view_when_it_can_be():
    """rows_major: the memory of a contiguous [B, M, H, d], same values; the SDPA ops' own output passes as is."""
    x = torch.randn(2, 3, 5, 8)
    y = fused_ops.rows_major(x)
    assert torch.equal(x, y) and y.stride() == (120, 8, 24, 1)
    assert fused_ops.rows_major(y) is y and fused_ops.rows_major(x[:, :, :1]) is not None


# ----------------------------------------------------------------------------- defect 4: sliding windows
def test_flash_window_equals_block_visibility():
    """Over many blocks and windows: the rows outside live_block see no key; on the live rows, FlashAttention's
    bottom-right local mask with flash_window's (left, right), after mha_fwd's clamps, is exactly the block's
    visibility (k <= q, q - k < window); and every block the attention makes (a state prefix: keys before the
    first query; a segment's own keys: a square) gets a window: none of them falls back to math."""
    checked = 0
    for qp, kp, tq, tk, w in ((qp, kp, tq, tk, w) for qp in range(0, 12, 3) for kp in range(0, 12, 2)
                              for tq in (1, 3, 5, 9) for tk in (1, 2, 4, 6) for w in (1, 2, 3, 5, 8)):
        b = Block(qp, kp, tq, tk, w)
        want = kernels._visible(b, torch.device("cpu"))
        live = kernels.live_block(b)
        if live is None:
            assert not want.any(), b
            continue
        rows = slice(live.q_pos - qp, live.q_pos - qp + live.tq)
        assert want[rows].any(-1).all() and not want[:rows.start].any() and not want[rows.stop:].any(), (b, live)
        lr = kernels.flash_window(live)
        if lr is None:
            assert kp + tk - 1 > qp and (qp, tq) != (kp, tk), (b, live)  # neither a prefix nor a square block
            continue
        assert torch.equal(_visible(live.tq, tk, *StandIns._window(tk, False, *lr)), want[rows]), (b, live, lr)
        checked += 1
    assert checked > 500, checked


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_window_blocks_go_to_the_windowed_flash_kernel(dtype):
    """A block cut by a sliding window goes to cuda_flash_window on CUDA fp16/bf16 with flash attention (head dim
    <= 256), else to the math kernel with the window named; fully visible / causal-square blocks are unchanged."""
    cut = [Block(20, 16, 6, 4, 8), Block(20, 10, 8, 10, 12), Block(0, 0, 16, 16, 4)]
    for b, caps, hd in ((b, Caps(f, e), hd) for b in cut for f in (False, True) for e in (False, True)
                        for hd in (64, 256, 264)):
        choice = kernels.choose_kernel(b, dtype, "cuda", caps, 0.0, hd)
        if dtype in (torch.bfloat16, torch.float16) and caps.cuda_flash and hd <= 256:
            assert choice == kernels.Choice(CUDA_FLASH_WINDOW), (b, caps, hd, choice)
        else:
            assert choice.kernel == MATH and choice.case == "window", (b, caps, hd, choice)
        assert kernels.choose_kernel(b, dtype, "cpu", caps, 0.0, hd).case == "window"


# ----------------------------------------------------------------------------- the whole CUDA path, model level
CASES = {
    # (caps, float64 presented as, kernels that must run, kernels that must not)
    "flash bf16": (Caps(True, True), torch.bfloat16, {CUDA_FLASH}, {MATH, CUDA_EFFICIENT}),
    "efficient bf16": (Caps(False, True), torch.bfloat16, {CUDA_EFFICIENT}, {CUDA_FLASH, CUDA_FLASH_WINDOW}),
    "efficient fp32": (Caps(True, True), torch.float32, {CUDA_EFFICIENT}, {CUDA_FLASH, CUDA_FLASH_WINDOW}),
}


@pytest.mark.parametrize("family", ["llama head dim 12", "mistral_window", "deepseek_v3_mla"])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_path_trains_exactly(cuda_ops, monkeypatch, family, case):
    """Chunked training through the CUDA dispatch and the CUDA ops' contracts (stand-ins) equals the float64
    full-sequence reference (GQA, head dims padded to 8, MLA v, sliding windows on the windowed flash kernel,
    K = 2); the forced kernels ran, and no window block fell back to math when flash attention is there."""
    caps, as_dtype, must, must_not = CASES[case]
    if family == "llama head dim 12":
        model, tol = build_tiny_model("llama", dtype=torch.float64, hidden_size=48), 1e-10
    else:
        model_type, _, overrides, tol = exact_case(family)
        model = build(model_type, overrides)
    with cuda_dispatch(monkeypatch, caps, float64_as=as_dtype) as used:
        loss_err, grad_err = chunked_errors(model, make_sequences([45, 11, 5, 1], model.config.vocab_size), 8, 2)
    assert loss_err < tol and grad_err < tol, (loss_err, grad_err)
    used = set(used)
    if family == "mistral_window":
        must = must | ({CUDA_FLASH_WINDOW} if caps.cuda_flash and as_dtype != torch.float32 else {MATH})
    else:
        must_not = must_not | {CUDA_FLASH_WINDOW}
    assert must <= used and not (must_not & used), (sorted(used), must, must_not)


@pytest.mark.parametrize("segment", [5, 11, 30])
def test_window_prefix_block_longer_than_the_window(cuda_ops, monkeypatch, segment):
    """A state-prefix block of a segment longer than the window (rows past the window's reach) runs on the
    windowed flash kernel with only its live rows sent; out, lse and gradients equal the math kernel's
    (float64 presented as bf16), the dead rows are out 0, lse -inf, dq 0."""
    g = torch.Generator().manual_seed(1)
    window, position = 8, 20
    b = Block(position, position - window + 1, segment, window - 1, window)  # as attention._blocks makes it
    q, do = (torch.randn(1, 2, segment, 16, dtype=torch.float64, generator=g) for _ in range(2))
    k, v = (torch.randn(1, 2, window - 1, 16, dtype=torch.float64, generator=g) for _ in range(2))
    with cuda_dispatch(monkeypatch, Caps(True, True), float64_as=torch.bfloat16) as used:
        out, lse = kernels.block_forward(q, k, v, b, 0.25)
        grads = kernels.block_backward(do, q, k, v, out, lse, b, 0.25)
    assert set(used) == {CUDA_FLASH_WINDOW} and cuda_ops.calls["flash_window"] == 1
    ref_out, ref_lse = kernels.math_forward(q, k, v, b, 0.25)
    ref = kernels.math_backward(do, q, k, v, ref_out, ref_lse, b, 0.25)
    torch.testing.assert_close((out, lse), (ref_out, ref_lse), rtol=0, atol=1e-12)
    torch.testing.assert_close(grads, ref, rtol=0, atol=1e-12)
    if segment >= window:
        assert (lse[..., window - 1:] == -math.inf).all() and (grads[0][:, :, window - 1:] == 0).all()


def test_windowed_flash_op_accepts_our_arguments():
    """The real aten ops' schemas (meta kernels) take the windowed flash backend's arguments ([B, M, H, d] views,
    window_size_left/right) and give the shapes the merge needs (a block with dead rows: the live ones are sent)."""
    b = Block(20, 13, 10, 7, 8)
    q = torch.empty(1, 4, 10, 24, dtype=torch.bfloat16, device="meta")
    k, v = (torch.empty(1, 4, 7, d, dtype=torch.bfloat16, device="meta") for d in (24, 20))
    backend = kernels.BACKENDS[CUDA_FLASH_WINDOW]
    out, lse = kernels.fused_forward(backend, q, k, v, b, 0.2)
    assert out.shape == (1, 4, 10, 20) and lse.shape == (1, 4, 10) and lse.dtype == torch.float32
    dq, dk, dv = kernels.fused_backward(backend, torch.empty_like(out), q, k, v, out, lse, b, 0.2)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_windowed_forward_maps_empty_rows_to_minus_inf(cuda_ops):
    """FlashAttention-2 writes lse +inf for a row that sees no key; the windowed backend hands the merge -inf
    (the live-row cut normally keeps such rows away from the kernel; this is the kernel-level guarantee)."""
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    k = v = torch.randn(1, 2, 2, 8, dtype=torch.float64)
    out, lse = fused_ops.cuda_flash_window_forward(q, k, v, (0, 0), 0.3)  # bottom-right: rows 0, 1 see nothing
    assert (lse[..., :2] == -math.inf).all() and torch.isfinite(lse[..., 2:]).all()
    assert (out[:, :, :2] == 0).all()


# ----------------------------------------------------------------------------- defect 2: varlen under sequence parallelism
@pytest.mark.distributed
@pytest.mark.parametrize("num_tokens", [16, 15])
def test_varlen_under_sequence_parallelism_returns_my_rows(tmp_path, num_tokens):
    """On 2 gloo ranks, a state-free packed chunk that takes the flash-attn varlen path (stand-in) under sequence
    parallelism returns this rank's rows with all heads, [1, ceil(T/2), H, d], equal to the whole-chunk call's
    rows, and so do the gradients of q, k, v (T even, where a wrong layout would still reshape, and T odd)."""
    from ds_chunkflow.testing.spawn import run_ranks
    from tests.helpers.contract_workers import sp_varlen_attention

    out = tmp_path / "sp.pt"
    run_ranks(sp_varlen_attention, num_tokens, str(out), timeout=120)
    for rank in range(2):
        r = torch.load(f"{out}.{rank}")
        assert r["calls"] == 2 and r["shape"] == (1, -(-num_tokens // 2), 4, 8), r
        assert r["out_err"] < 1e-12 and max(r["grad_errs"]) < 1e-12, r
