"""The flash-attn varlen path for packed chunks, on CPU against a stand-in with flash-attn's interface.

The stand-in is ``flash_attn_varlen_func``'s signature implemented with plain PyTorch (per
segment, causal, window, GQA) in the input dtype; plugged in through ``varlen.varlen_fn_for``
it runs the real packing, ``cu_seqlens`` and unpacking of ``ds_chunkflow.ops.attention``.
"""

import sys
import types
import warnings

import pytest
import torch

import ds_chunkflow
from ds_chunkflow.hf.guard import check_model
from ds_chunkflow.ops import varlen
from ds_chunkflow.testing.families import build, exact_case
from ds_chunkflow.testing.models import build_tiny_model
from tests.helpers.exactness import chunked_errors
from tests.helpers.reference import make_sequences


class VarlenStandIn:
    """``flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size,
    softcap)``."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                 softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, **unused):
        assert q.dim() == 3 and k.dim() == 3 and q.shape[-1] == k.shape[-1] == v.shape[-1]
        assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
        assert causal and dropout_p == 0.0 and isinstance(max_seqlen_q, int)
        borders = cu_seqlens_q.tolist()
        assert borders[0] == 0 and borders[-1] == q.shape[0] and max_seqlen_q == max(
            b - a for a, b in zip(borders, borders[1:]))
        self.calls.append((borders, tuple(window_size), softcap))
        n_rep = q.shape[1] // k.shape[1]
        outs = []
        for a, b in zip(borders, borders[1:]):
            qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H, n, d]
            ks, vs = ks.repeat_interleave(n_rep, 0), vs.repeat_interleave(n_rep, 0)
            s = (qs @ ks.transpose(-1, -2)) * softmax_scale
            if softcap > 0:  # flash-attn: tanh on the scaled scores
                s = torch.tanh(s / softcap) * softcap
            i = torch.arange(b - a)
            vis = i[None, :] <= i[:, None]
            if window_size[0] >= 0:
                vis &= (i[:, None] - i[None, :]) <= window_size[0]
            outs.append((s.masked_fill(~vis, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
        return torch.cat(outs)


@pytest.fixture
def stand_in(monkeypatch):
    fn = VarlenStandIn()
    monkeypatch.setattr(varlen, "varlen_fn_for", lambda q, dropout, head_dim=None: fn if dropout == 0 else None)
    return fn


def test_cu_seqlens_and_tiling():
    """cu_seqlens are the int32 running borders; segments must tile the chunk in order (clear errors otherwise)."""
    cu, longest = varlen.cu_seqlens([3, 2, 1])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6] and longest == 3
    assert varlen.segment_lengths([(0, 3), (3, 2), (5, 1)], 6) == [3, 2, 1]
    with pytest.raises(ValueError, match="starts at row 4, expected 3"):
        varlen.segment_lengths([(0, 3), (4, 2)], 6)
    with pytest.raises(ValueError, match="cover 5 rows of a chunk of 6"):
        varlen.segment_lengths([(0, 3), (3, 2)], 6)
    with pytest.raises(ValueError, match="positive"):
        varlen.cu_seqlens([3, 0])


def test_pack_unpack_layout():
    """pack: [1, H, T, d] -> [T, H, d] (row t of head h is x[0, h, t]); unpack gives [1, T, H, d], the attention
    interface's return layout."""
    x = torch.randn(1, 3, 7, 4)
    p = varlen.pack(x)
    assert p.shape == (7, 3, 4) and p.is_contiguous()
    assert torch.equal(p[5, 2], x[0, 2, 5])
    assert torch.equal(varlen.unpack(p), x.transpose(1, 2))
    with pytest.raises(ValueError, match="one chunk"):
        varlen.pack(torch.randn(2, 3, 7, 4))


def _compare(model, lengths, chunk, keep=1):
    return chunked_errors(model, make_sequences(lengths, model.config.vocab_size), chunk, keep)

@pytest.mark.parametrize("case", ["llama", "mistral_window", "deepseek_v3_mla"])
def test_packed_chunks_through_one_varlen_call_are_exact(stand_in, case):
    """Packed chunks without a state prefix go through ONE varlen call per layer (all segments), dependent chunks
    keep the block path; loss and gradients equal the full-sequence reference in float64 (GQA, sliding window
    (window_size=(w-1, 0)), MLA's padded v)."""
    if case == "llama":
        model, tol = build_tiny_model("llama", dtype=torch.float64), 1e-10
    else:
        model_type, _, overrides, tol = exact_case(case)
        model = build(model_type, overrides)
    check_model(model)  # the guard's probe (cached per model) runs packed chunks too: keep it out of the count
    stand_in.calls.clear()
    loss_err, grad_err = _compare(model, [30, 13, 2, 1], chunk=16)  # 30: 2 dependent chunks; 13 > window 12
    assert loss_err < tol and grad_err < tol, (loss_err, grad_err)
    # the one packed chunk [13 | 2 | 1]: one call per layer, all four segments in it
    assert [c[0] for c in stand_in.calls] == [[0, 13, 15, 16]] * model.config.num_hidden_layers, stand_in.calls
    window = getattr(model.config, "sliding_window", None)
    assert all(c[1] == ((-1, -1) if window is None else (window - 1, 0)) for c in stand_in.calls)


def test_softcap_goes_to_the_varlen_call_and_sinks_do_not(stand_in):
    """Gemma 2's attention softcap is passed to flash-attn's varlen call (``softcap``) for packed chunks and the
    result equals the full-sequence reference (float32-exact model); GPT-OSS's attention sinks, which
    flash-attn's varlen function does not take, keep every chunk on the block path (no varlen call)."""
    model_type, _, overrides, tol = exact_case("gemma2_softcap")
    model = build(model_type, overrides)
    check_model(model)
    stand_in.calls.clear()
    loss_err, grad_err = _compare(model, [30, 13, 2, 1], chunk=16)
    assert loss_err < tol and grad_err < tol, (loss_err, grad_err)
    assert stand_in.calls and all(c[2] == model.config.attn_logit_softcapping for c in stand_in.calls)
    model_type, _, overrides, tol = exact_case("gpt_oss")
    model = build(model_type, overrides)
    check_model(model)
    stand_in.calls.clear()
    loss_err, grad_err = _compare(model, [30, 13, 2, 1], chunk=16)
    assert loss_err < tol and grad_err < tol and stand_in.calls == [], (loss_err, grad_err, stand_in.calls)


def test_dependent_chunks_never_take_varlen(stand_in):
    """Chunks of a split sequence never take the varlen path, not even the first (it writes the group's state)."""
    model = build_tiny_model("llama", dtype=torch.float64)
    check_model(model)
    stand_in.calls.clear()
    seqs = make_sequences([40], model.config.vocab_size)
    ds_chunkflow.chunked_forward_backward(model, seqs, chunk_size=16)
    assert stand_in.calls == []


def test_varlen_choice():
    """varlen_fn_for: only CUDA fp16/bf16 queries without dropout and with head dim <= 256 ask for flash-attn."""
    cpu = torch.empty(1, 2, 3, 8, dtype=torch.bfloat16)
    meta = torch.empty(1, 2, 3, 8, dtype=torch.bfloat16, device="meta")
    assert varlen.varlen_fn_for(cpu, 0.0) is None and varlen.varlen_fn_for(meta, 0.0) is None


@pytest.mark.parametrize("version,usable", [("2.5.9", False), ("2.6.0", True), ("2.8.3", True), ("2.9.0", False),
                                            ("3.0.0b1", False), ("garbage", False)])
def test_flash_attn_version_is_checked(monkeypatch, version, usable):
    """flash-attn is used only inside the supported range (2.6 <= v < 2.9); outside it warns naming the version
    and the range, and packed chunks fall back to the block path. DS_CHUNKFLOW_FLASH_ATTN=0 turns it off."""
    fake = types.ModuleType("flash_attn")
    fake.__version__ = version
    fake.flash_attn_varlen_func = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    varlen._import_flash_attn.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn = varlen.flash_attn_varlen_func()
        assert (fn is fake.flash_attn_varlen_func) == usable
        assert any(version in str(w.message) and ">=2.6, <2.9" in str(w.message) for w in caught) != usable
        monkeypatch.setenv("DS_CHUNKFLOW_FLASH_ATTN", "0")
        assert varlen.flash_attn_varlen_func() is None
    finally:
        varlen._import_flash_attn.cache_clear()


@pytest.mark.parametrize("dqk,dv", [(8, 8), (16, 8), (8, 20)])
@pytest.mark.parametrize("window", [None, 3])
def test_varlen_pads_to_the_larger_head_dim(dqk, dv, window):
    """flash-attn 2 takes one head dim for q, k, v: the smaller side is zero-padded (v for MLA, q/k when v's head
    dim is the larger) and the output cut to v's; out and the q/k/v gradients equal plain per-segment attention."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 9, dqk, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 9, dqk, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 9, dv, dtype=torch.float64, generator=g, requires_grad=True)
    fn = VarlenStandIn()
    out = varlen.attention(fn, q, k, v, [5, 4], 0.3, window)
    assert out.shape == (1, 9, 4, dv) and len(fn.calls) == 1
    ref = []
    for a, b in ((0, 5), (5, 9)):
        qs, ks, vs = q[:, :, a:b], k[:, :, a:b].repeat_interleave(2, 1), v[:, :, a:b].repeat_interleave(2, 1)
        i = torch.arange(b - a)
        vis = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < window) if window else True)
        ref.append(((qs @ ks.transpose(-1, -2) * 0.3).masked_fill(~vis, float("-inf")).softmax(-1) @ vs))
    ref = torch.cat(ref, 2).transpose(1, 2)
    dout = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_varlen_choice_counts_the_larger_head_dim():
    """The varlen path is asked for only on CUDA fp16/bf16 without dropout when the larger of the q/k and v head
    dims (attention passes it) fits flash-attn (<= 256 after padding to 8)."""
    bf16 = torch.bfloat16
    assert varlen.usable("cuda", bf16, 0.0, 256) and varlen.usable("cuda", torch.float16, 0.0, 250)
    assert not varlen.usable("cuda", bf16, 0.0, 257) and not varlen.usable("cuda", bf16, 0.1, 64)
    assert not varlen.usable("cuda", torch.float32, 0.0, 64) and not varlen.usable("cpu", bf16, 0.0, 64)
    assert varlen.varlen_fn_for(torch.empty(1, 2, 3, 8, dtype=bf16, device="meta"), 0.0, head_dim=512) is None


@pytest.mark.parametrize("error", ["OSError('libcudart.so.13: cannot open shared object file')",
                                   "ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda')",
                                   "RuntimeError('CUDA driver version is insufficient')",
                                   "ModuleNotFoundError('No module named einops', name='einops')"])
def test_broken_flash_attn_is_not_used(tmp_path, monkeypatch, error):
    """A flash-attn that is installed but cannot be imported (built against another torch / CUDA: OSError, undefined
    symbols, a missing dependency) is not used: packed chunks take the block path and a warning names the error;
    a flash-attn that is not installed is silently absent."""
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"__version__ = '2.8.3'\nraise {error}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    varlen._import_flash_attn.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert varlen.flash_attn_varlen_func() is None
        assert any("cannot be imported" in str(w.message) and error.split("(")[0] in str(w.message) for w in caught)
        monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed: ModuleNotFoundError, no warning
        varlen._import_flash_attn.cache_clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert varlen.flash_attn_varlen_func() is None
        assert not caught, [str(w.message) for w in caught]
    finally:
        monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
        varlen._import_flash_attn.cache_clear()
