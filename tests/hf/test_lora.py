"""LoRA (peft) through chunked training: ``ds_chunkflow/hf/lora.py`` and the guard's view of a PeftModel.

Exactness is measured as in tests/deepspeed/test_engine.py: the adapters' fp32 parameter *updates*
against a single-process plain PEFT reference (full-sequence forwards, sum CE / label tokens, the same
SGD-momentum over the adapters), so a zero, halved or misrouted adapter gradient fails; the frozen base
must come out bitwise unchanged.
"""

import pytest
import torch

import ds_chunkflow
from ds_chunkflow.hf.guard import ModelRefused, check_model
from ds_chunkflow.hf.lora import LoraRefused, apply_lora, decoder_linear_names
from ds_chunkflow.hf.model import base_model_of
from ds_chunkflow.testing.models import build_tiny_model
from ds_chunkflow.testing.spawn import run_ranks
from tests.helpers.lora_workers import lora_model, reference_lora, train_lora
from tests.helpers.reference import make_sequences, reference_loss_and_grads

peft = pytest.importorskip("peft")


def test_default_targets_are_every_decoder_linear():
    """apply_lora's default adapts every nn.Linear inside the decoder blocks and nothing else (not lm_head,
    not the embeddings); only the adapters train."""
    from peft.tuners.lora import LoraLayer

    model = apply_lora(build_tiny_model("qwen2"), r=2, alpha=4)
    inner = base_model_of(model)
    adapted = {n for n, m in inner.named_modules() if isinstance(m, LoraLayer)}
    linears = set(decoder_linear_names(build_tiny_model("qwen2")))
    assert adapted == linears and len(linears) == 2 * 7, sorted(adapted ^ linears)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable
    assert not isinstance(inner.lm_head, LoraLayer)


@pytest.mark.parametrize("keep_chunks, options", [(1, {}), (2, {}), (1, {"offload_activations": True})],
                         ids=["K1", "K2", "K1-offload"])
def test_chunked_step_matches_plain_peft(keep_chunks, options):
    """float64, one process: chunked_forward_backward on a PeftModel gives the plain PEFT model's loss
    and adapter gradients (full-sequence forwards) to float64 rounding; the base gets no gradient."""
    model = lora_model().double()
    seqs = make_sequences([5, 7, 50, 23], model.config.vocab_size, seed=1)
    ref_loss, ref = reference_loss_and_grads(model, seqs)
    model.zero_grad(set_to_none=True)
    loss = ds_chunkflow.chunked_forward_backward(model, seqs, chunk_size=16, keep_chunks=keep_chunks, **options)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref.keys() and all("lora_" in n for n in grads), sorted(grads.keys() ^ ref.keys())
    assert abs(loss.item() - ref_loss.item()) <= 1e-12 * abs(ref_loss.item())
    worst = max((grads[n] - r).abs().max().item() / r.abs().max().item() for n, r in ref.items())
    assert worst < 1e-10, worst


def test_guard_judges_the_model_inside_the_wrapper():
    """A PeftModel passes the guard when the transformers model inside it does (the wrapper declares no
    attention interface itself), and the report names the inner class."""
    report = check_model(lora_model())
    assert report.model_class == "PeftModelForCausalLM(Qwen2ForCausalLM)" and report.max_error < report.tolerance


def test_prompt_learning_is_refused():
    """Prompt tuning adds virtual tokens to every forward, i.e. once per chunk: refused, naming the method."""
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(build_tiny_model("qwen2"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ModelRefused, match="PROMPT_TUNING adds virtual tokens"):
        check_model(model)


def test_quantized_base_is_refused_without_cuda(monkeypatch):
    """A bitsandbytes-quantised base (QLoRA) needs CUDA: on a CPU-only machine apply_lora and the guard refuse
    it with a message naming the quantisation, before any training."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = build_tiny_model("qwen2")
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(LoraRefused, match="bitsandbytes 4-bit.*need a CUDA GPU"):
        apply_lora(model)
    model.config.quantization_config = None
    peft_model = apply_lora(model)
    base_model_of(peft_model).config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    with pytest.raises(LoraRefused, match="8-bit"):
        check_model(peft_model)


STEPS = 3


def _run_two_ranks(tmp_path, stage, chunkflow, break_mode=None, long_len=None):
    out, adapter_dir = tmp_path / "lora.pt", tmp_path / "adapter"
    run_ranks(train_lora, stage, STEPS, str(out), chunkflow, str(adapter_dir), break_mode, long_len)
    return [torch.load(f"{out}.{r}") for r in range(2)], adapter_dir


def adapter_update_errors(result, ref_before, ref_after):
    """Per adapter parameter ``||u - u_ref|| / ||u_ref||`` of the fp32 updates (a zero update: 1.0)."""
    errors = {}
    for name, after in ref_after.items():
        key = name if name in result["after"] else None
        assert key is not None, f"{name} did not train (trainable: {sorted(result['trainable'])[:4]}...)"
        u_ref = (after - ref_before[name]).double()
        assert u_ref.norm() > 0, f"the reference does not update {name}"
        u = (result["after"][name] - result["before"][name]).double()
        errors[name] = ((u - u_ref).norm() / u_ref.norm()).item()
    return errors


def assert_lora_exact(results, adapter_dir, long_len=None):
    ref_losses, ref_before, ref_after, ref_base = reference_lora(STEPS, long_len)
    for r in results:
        for a, b in zip(r["losses"], ref_losses):
            assert abs(a - b) / abs(b) < 1e-5, (r["losses"], ref_losses)
    assert results[0]["trainable"] == set(ref_after), sorted(results[0]["trainable"] ^ set(ref_after))[:4]
    errors = adapter_update_errors(results[0], ref_before, ref_after)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 2e-5, (worst, errors[worst])
    for name, initial in ref_base.items():  # the frozen base: bitwise as it started, on every rank
        assert all(torch.equal(r["module"][name], initial) for r in results), f"base weight {name} changed"
    # the adapter written under ZeRO (gathered) is the trained one
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(build_tiny_model("qwen2", seed=0), adapter_dir)
    saved = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert saved.keys() == ref_after.keys()
    assert all(torch.equal(saved[n], results[0]["module"][n]) for n in saved)
    return errors[worst]


SP_LONG = 9 * 16 + 5  # a dominant sample: the cost model spreads it over both ranks


@pytest.mark.distributed
@pytest.mark.parametrize("stage, chunkflow, long_len", [
    (2, {"keep_chunks": 2, "sequence_parallel": {"max_size": 2}}, SP_LONG),
    (3, {"keep_chunks": 2, "offload": {"activations": "far"}, "recompute_layers": "all"}, None),
], ids=["zero2-K2-sequence-parallel", "zero3-K2-offload-recompute"])
def test_two_ranks_lora_matches_plain_peft(tmp_path, stage, chunkflow, long_len):
    """2 gloo ranks, chunked (split + packed sequences; with sequence parallelism a dominant sample spread
    over both ranks): the adapters' updates over 3 SGD-momentum steps equal the plain PEFT reference's to
    2e-5 of their size, the losses to 1e-5; the base weights are bitwise unchanged; the adapter saved by
    save_adapter (ZeRO-3: gathered) loads as the trained one."""
    results, adapter_dir = _run_two_ranks(tmp_path, stage, chunkflow, long_len=long_len)
    if long_len is not None:
        assert all(r["metrics"]["sequence_parallel_groups"] == 1 for r in results), results[0]["metrics"]
    assert_lora_exact(results, adapter_dir, long_len)  # measured: 5.0e-6 (ZeRO-2, SP), 5.5e-6 (ZeRO-3)
