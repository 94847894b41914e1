"""The gpu tier (``pytest -m gpu``; skipped without CUDA): exactness of the CUDA kernels and offload copies.

Chunked training on CUDA in bf16 / fp32 against the plain full-sequence reference
(tests/helpers/reference.py) computed in float64 on the CPU from the same weights. A low-precision
run cannot match float64 to rounding, so the bound is relative to what plain training in
the same dtype on the same GPU achieves: ``err(chunked) <= 3 * err(plain) + floor``. Each
case forces one dispatch (flash-attn varlen for packed chunks; PyTorch's aten flash op, with
its windowed form for sliding-window blocks; the aten memory-efficient op) and checks that the
forced kernel really ran. Also: every EXACT family in bf16, the efficient backward and the
windowed flash op against the math kernel, offload through the side stream (its own byte
counters), and the engine on one GPU (ZeRO-2 / ZeRO-3, bf16). Untested until run on a GPU:
``scripts/gpu_check.sh`` runs this file and fails if it skips instead of running.
"""

import contextlib
import copy

import pytest
import torch

import ds_chunkflow
from ds_chunkflow.ops import cuda_streams, kernels, varlen
from ds_chunkflow.testing.families import EXACT, build, exact_case
from ds_chunkflow.testing.models import build_tiny_model
from tests.helpers.reference import make_sequences, max_rel_err, reference_loss_and_grads

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

        def recording_pick(q, dropout, head_dim=None):
            chosen = pick(q, dropout, head_dim)
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
@pytest.mark.parametrize("case", ["llama", "mistral_window", "deepseek_v3_mla", "gpt_oss"])
@pytest.mark.parametrize("keep", [1, 2])
def test_chunked_matches_reference_on_cuda(case, mode, dtype, keep, monkeypatch):
    """Chunked training on CUDA is as close to the float64 reference as plain training in the same dtype
    (bf16 / fp32; GQA, sliding window, MLA head dims, attention sinks folded into the fused kernels' out / lse;
    K = 1, 2), through the forced kernel, which ran (GPT-OSS's sinks keep its packed chunks off varlen)."""
    used, _ = _check(case, dtype, mode, monkeypatch, keep=keep)
    expected = kernels.CUDA_FLASH if (case, mode) == ("gpt_oss", "flash_attn") else EXPECTED[(mode, dtype)]
    assert expected in used, sorted(set(used))
    if mode == "aten_efficient":
        assert kernels.CUDA_FLASH not in used and kernels.CUDA_FLASH_WINDOW not in used
    flash = dtype == torch.bfloat16 and mode != "aten_efficient"
    windowed = case in ("mistral_window", "gpt_oss")
    if windowed and flash:
        assert kernels.CUDA_FLASH_WINDOW in used, sorted(set(used))
    if not windowed or flash:
        assert kernels.MATH not in used, f"a block fell back to the math kernel: {sorted(set(used))}"


@pytest.mark.parametrize("family", sorted(EXACT))
def test_family_on_cuda(family, monkeypatch):
    """Every EXACT family (dense, rope variants, tied, qk-norm, post-norm, recurrent hybrids, attention sinks)
    trains chunked on CUDA in bf16 through PyTorch's fused kernels (K = 2) as close to its float64 reference as
    plain bf16 training on the same GPU, with no attention block on the math kernel; except an attention
    softcap (Gemma 2), which no fused SDPA kernel takes: every block of it on the math kernel."""
    used, _ = _check(family, torch.bfloat16, "aten", monkeypatch, keep=2)
    if exact_case(family)[2].get("attn_logit_softcapping") is not None:
        assert set(used) == {kernels.MATH}, sorted(set(used))
    else:
        assert kernels.CUDA_FLASH in used and kernels.MATH not in used, sorted(set(used))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("options", [dict(offload_activations=True), dict(state_offload_min_tokens=0)], ids=str)
def test_offload_on_cuda(dtype, options, monkeypatch):
    """Activation offload (pinned host copies on a side stream) and K/V-state offload (pinned buffers, async
    writes, event-ordered reads) on CUDA stay as close to the reference as plain training, and the bytes went
    through the side-stream copy path into pinned memory (its own counters: the executor's grow on the CPU
    fallback too) and came back."""
    stream = cuda_streams.copy_stream(torch.device("cuda"))
    before = (stream.bytes_to_host, stream.bytes_pinned, stream.bytes_to_device)
    _, stats = _check("llama", dtype, "aten", monkeypatch, keep=1, **options)
    moved = stats.offloaded_bytes if "offload_activations" in options else stats.state_bytes_moved
    to_host, pinned, to_device = (after - b for after, b in
                                  zip((stream.bytes_to_host, stream.bytes_pinned, stream.bytes_to_device), before))
    assert moved > 0 and to_host > 0 and pinned == to_host and to_device > 0, (moved, to_host, pinned, to_device)
    if "offload_activations" in options:
        assert to_host == stats.offloaded_bytes, (to_host, stats.offloaded_bytes)


@pytest.mark.parametrize("causal", [False, True])
def test_efficient_backward_matches_math_on_cuda(causal):
    """The memory-efficient backward in bf16 (out handed over as [B, M, H, d] memory) gives the math kernel's
    gradients to bf16 precision. Printed (pytest -rP, in gpu_check's log): the same op's errors with a
    [B, H, M, d]-contiguous out, the layout that broke the delta term (issue 27, item 1)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shape_q, shape_k = (1, 4, 200, 64), (1, 4, 200 if causal else 150, 64)
    q, do = (torch.randn(shape_q, generator=g, device="cuda").bfloat16() for _ in range(2))
    k, v = (torch.randn(shape_k, generator=g, device="cuda").bfloat16() for _ in range(2))
    b = kernels.Block(0, 0, 200, 200) if causal else kernels.Block(150, 0, 200, 150)
    backend = kernels.BACKENDS[kernels.CUDA_EFFICIENT]
    out, lse = kernels.fused_forward(backend, q, k, v, b, 0.125)
    out = out.contiguous()
    got = kernels.fused_backward(backend, do, q, k, v, out, lse, b, 0.125)
    ref = kernels.math_backward(do, q, k, v, out, lse, b, 0.125)
    errs = _rel_errs(got, ref)
    # the op itself with a [B, H, M, d]-contiguous out (what kernels.py passed before): reported, not asserted
    seed, offset = (torch.empty((), dtype=torch.int64, device="cuda") for _ in range(2))
    raw = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        do, q, k, v, None, out, kernels._pad_last(lse, 224).contiguous(), seed, offset, 0.0, [True, True, True, False],
        b.is_causal, scale=0.125)
    print("efficient backward bf16 rel errors (dq, dk, dv):", dict(fixed=errs, contiguous_out=_rel_errs(raw[:3], ref)))
    assert max(errs) < 2e-2, errs


def _rel_errs(got, ref):
    return [((x.float() - y.float()).abs().max() / y.float().abs().max()).item() for x, y in zip(got, ref)]


def test_window_kernel_matches_math_on_cuda():
    """A state-prefix block of a segment longer than the window runs on aten._flash_attention_forward/_backward
    with (left, right) from flash_window (live rows only) and equals the math kernel in bf16."""
    g = torch.Generator(device="cuda").manual_seed(0)
    window, position, seg = 64, 256, 200
    b = kernels.Block(position, position - window + 1, seg, window - 1, window)
    q, do = (torch.randn(1, 4, seg, 64, generator=g, device="cuda").bfloat16() for _ in range(2))
    k, v = (torch.randn(1, 4, window - 1, 64, generator=g, device="cuda").bfloat16() for _ in range(2))
    choice = kernels.choose_kernel(b, torch.bfloat16, "cuda", kernels.cuda_caps(q.device), 0.0, 64)
    assert choice.kernel == kernels.CUDA_FLASH_WINDOW, choice
    out, lse = kernels.block_forward(q, k, v, b, 0.125)
    ref_out, ref_lse = kernels.math_forward(q, k, v, b, 0.125)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and (lse[..., window - 1:] == -torch.inf).all()
    live = ~torch.isinf(ref_lse)
    assert (lse[live] - ref_lse[live]).abs().max() < 1e-2
    assert max(_rel_errs([out], [ref_out])) < 2e-2, _rel_errs([out], [ref_out])
    got = kernels.block_backward(do, q, k, v, ref_out, ref_lse, b, 0.125)
    ref = kernels.math_backward(do, q, k, v, ref_out, ref_lse, b, 0.125)
    assert max(_rel_errs(got, ref)) < 2e-2, _rel_errs(got, ref)


@pytest.mark.parametrize("stage", [2, 3])
def test_engine_on_one_gpu_bf16(tmp_path, stage):
    """ChunkFlowEngine on one GPU (NCCL, DeepSpeed's CUDA accelerator), bf16, ZeRO-2 / ZeRO-3: over 3 SGD-momentum
    steps the fp32 masters move as the fp32 CPU reference's parameters do, to bf16 precision (relative L2 error
    of the updates < 3% overall, < 8% per parameter: the 2-rank CPU test's 2% / 5% bounds, widened for GPU bf16
    kernels; a zero update is 1.0, a half one 0.5); the losses agree to 3%."""
    from ds_chunkflow.testing.spawn import run_ranks
    from tests.deepspeed.test_engine import update_errors
    from tests.helpers.workers import reference_steps, train_steps

    out = tmp_path / "result.pt"
    run_ranks(train_steps, stage, 3, str(out), None, {"bf16": {"enabled": True}}, world=1, timeout=300,
              accelerator="cuda")
    r = torch.load(f"{out}.0")
    assert r["dtype"] == torch.bfloat16
    ref_losses, ref_after = reference_steps(3)
    per_param, overall = update_errors(r, ref_after)
    worst = max(per_param, key=per_param.get)
    assert overall < 3e-2 and per_param[worst] < 8e-2, (overall, worst, per_param[worst])
    for a, b in zip(r["losses"], ref_losses):
        assert abs(a - b) / abs(b) < 3e-2, (r["losses"], ref_losses)


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
