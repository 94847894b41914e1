"""The gpu tier (``pytest -m gpu``; skipped without CUDA): exactness of the CUDA kernels and offload copies.

Chunked training on CUDA in bf16 / fp32 against the plain full-sequence reference
(tests/reference.py) computed in float64 on the CPU from the same weights. A low-precision
run cannot match float64 to rounding, so the bound is relative to what plain training in
the same dtype on the same GPU achieves: ``err(chunked) <= 3 * err(plain) + floor``. Each
case forces one dispatch (flash-attn varlen for packed chunks; PyTorch's aten flash op; the
aten memory-efficient op) and checks that the forced kernel really ran. Untested until run
on a GPU: ``scripts/gpu_check.sh`` runs this file.
"""

import contextlib
import copy

import pytest
import torch
from reference import make_sequences, max_rel_err, reference_loss_and_grads

import ds_chunkflow
from ds_chunkflow import kernels, varlen
from ds_chunkflow.testing.families import build, exact_case
from ds_chunkflow.testing.models import build_tiny_model

pytestmark = pytest.mark.gpu

LENGTHS = [300, 90, 40, 7, 1]  # 300 -> 5 dependent chunks; the rest packed
CHUNK = 64
FLOOR = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


def _grads_cpu(model):
    return {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}


def _plain_loss_and_grads(model, seqs):
    """The reference's computation on the model's own device and dtype (stock attention)."""
    dev = next(model.parameters()).device
    moved = [{k: v.to(dev) for k, v in s.items()} for s in seqs]
    total, count = 0.0, 0
    for s in moved:
        logits = model(input_ids=s["input_ids"][None]).logits[0].float()
        targets = torch.cat([s["labels"][1:], s["labels"].new_full((1,), -100)])
        total = total + torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    loss = total / count
    loss.backward()
    return loss.item(), _grads_cpu(model)


@contextlib.contextmanager
def _mode(mode, monkeypatch):
    """Forces one dispatch; yields the list of kernels chosen (and 'varlen' per flash-attn call)."""
    used = []
    choose = kernels.choose_kernel

    def recording_choose(*args, **kwargs):
        choice = choose(*args, **kwargs)
        used.append(choice.kernel)
        return choice

    monkeypatch.setattr(kernels, "choose_kernel", recording_choose)
    if mode == "flash_attn":
        fn = varlen.flash_attn_varlen_func()
        if fn is None:
            pytest.skip("flash-attn not installed (or outside the supported range)")
        pick = varlen.varlen_fn_for

        def recording_pick(q, dropout):
            chosen = pick(q, dropout)
            if chosen is None:
                return None

            def call(*args, **kwargs):
                used.append("varlen")
                return chosen(*args, **kwargs)
            return call

        monkeypatch.setattr(varlen, "varlen_fn_for", recording_pick)
        yield used
        return
    monkeypatch.setenv("DS_CHUNKFLOW_FLASH_ATTN", "0")
    if mode == "aten_efficient":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            yield used
        return
    yield used


def _model(case, dtype):
    if case == "llama":
        model = build_tiny_model("llama", dtype=torch.float32, hidden_size=256)  # head dim 64, GQA 4/2
    else:
        model_type, _, overrides, _ = exact_case(case)
        model = build(model_type, overrides, dtype=torch.float32)
    return model.to(dtype)


def _check(case, dtype, mode, monkeypatch, keep=1, **options):
    model = _model(case, dtype)
    seqs = make_sequences(LENGTHS, model.config.vocab_size)
    ref = copy.deepcopy(model).double()
    ref.zero_grad(set_to_none=True)
    ref_loss, ref_grads = reference_loss_and_grads(ref, seqs)
    cuda = model.cuda()
    with _mode(mode, monkeypatch) as used:
        cuda.zero_grad(set_to_none=True)
        plain_loss, plain_grads = _plain_loss_and_grads(cuda, seqs)
        cuda.zero_grad(set_to_none=True)
        stats = ds_chunkflow.chunked_step(cuda, seqs, chunk_size=CHUNK, keep_chunks=keep, **options)
        torch.cuda.synchronize()
    chunk_grads = _grads_cpu(cuda)
    plain = (abs(plain_loss - ref_loss.item()) / abs(ref_loss.item()), max_rel_err(plain_grads, ref_grads))
    chunked = (abs(stats.loss.item() - ref_loss.item()) / abs(ref_loss.item()), max_rel_err(chunk_grads, ref_grads))
    for c, p in zip(chunked, plain):
        assert c <= 3 * p + FLOOR[dtype], dict(case=case, dtype=dtype, mode=mode, chunked=chunked, plain=plain)
    return used, stats


EXPECTED = {("flash_attn", torch.bfloat16): "varlen", ("aten", torch.bfloat16): kernels.CUDA_FLASH,
            ("aten", torch.float32): kernels.CUDA_EFFICIENT, ("aten_efficient", torch.bfloat16): kernels.CUDA_EFFICIENT}


@pytest.mark.parametrize("mode,dtype", sorted(EXPECTED, key=str), ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("case", ["llama", "mistral_window", "deepseek_v3_mla"])
@pytest.mark.parametrize("keep", [1, 2])
def test_chunked_matches_reference_on_cuda(case, mode, dtype, keep, monkeypatch):
    """Chunked training on CUDA is as close to the float64 reference as plain training in the same dtype
    (bf16 / fp32; GQA, sliding window, MLA head dims; K = 1, 2), through the forced kernel, which ran."""
    used, _ = _check(case, dtype, mode, monkeypatch, keep=keep)
    assert EXPECTED[(mode, dtype)] in used, sorted(set(used))
    if mode == "aten_efficient":
        assert kernels.CUDA_FLASH not in used
    if case != "mistral_window":
        assert kernels.MATH not in used, "a block without a window fell back to the math kernel"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("options", [dict(offload_activations=True), dict(state_offload_min_tokens=0)], ids=str)
def test_offload_on_cuda(dtype, options, monkeypatch):
    """Activation offload (pinned host copies on a side stream) and K/V-state offload (pinned buffers, async
    writes, event-ordered reads) on CUDA stay as close to the reference as plain training, and really move bytes."""
    _, stats = _check("llama", dtype, "aten", monkeypatch, keep=1, **options)
    assert stats.offloaded_bytes > 0 or stats.state_bytes_moved > 0


def test_long_prefix_stays_on_fused_kernels(monkeypatch):
    """A dependent chunk against a long state prefix (4K queries x 28K keys, bf16) runs on fused kernels only:
    no math block, whose fp32 scores alone would take 4K x 28K x 4 B = 448 MiB per head."""
    model = build_tiny_model("llama", dtype=torch.float32, hidden_size=256, num_layers=1).to(torch.bfloat16).cuda()
    seqs = make_sequences([32 * 1024], model.config.vocab_size)
    with _mode("aten", monkeypatch) as used:
        torch.cuda.reset_peak_memory_stats()
        ds_chunkflow.chunked_step(model, seqs, chunk_size=4096, keep_chunks=1)
        peak = torch.cuda.max_memory_allocated()
    assert set(used) == {kernels.CUDA_FLASH}, sorted(set(used))
    assert peak < 2 * 2**30, peak / 2**20
