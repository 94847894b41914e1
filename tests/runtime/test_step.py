"""Exactness of ``ds_chunkflow.chunked_forward_backward`` against full-sequence training."""

import math
from dataclasses import dataclass

import pytest
import torch

import ds_chunkflow
from ds_chunkflow.runtime.memory import ActivationMeter
from ds_chunkflow.testing.models import build_tiny_model
from tests.helpers.exactness import chunked_errors
from tests.helpers.reference import grads_of, make_sequences, max_rel_err, reference_loss_and_grads

CHUNK = 16
# split (8.2, 3, 1.06 chunks), packed short ones incl. lengths 1 and 2, one all-masked
LENGTHS = [8 * CHUNK + 3, 3 * CHUNK, 5, 1, 2, CHUNK - 1, CHUNK + 1, 17, 9]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _compare(model, seqs, keep_chunks, chunk_size=CHUNK, **options):
    return chunked_errors(model, seqs, chunk_size, keep_chunks, **options)

@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("keep", [1, 2, 9])
def test_matches_full_sequence_training(family, dtype, keep):
    """Loss and every parameter gradient equal those of unchunked training (N = 1..9, K in {1, 2, N})."""
    model = build_tiny_model(family, dtype=dtype)
    seqs = make_sequences(LENGTHS, model.config.vocab_size, all_masked={8})
    loss_err, grad_err = _compare(model, seqs, keep)
    assert loss_err < TOL[dtype] and grad_err < TOL[dtype], (loss_err, grad_err)


@pytest.mark.parametrize("keep", [2, 3])
def test_standalone_chunks_share_one_backward_per_k_and_stay_exact(keep):
    """Short sequences only (packed into 7 standalone chunks): with K = keep the step makes
    ceil(7 / K) backward calls (one gradient reduction each under ZeRO-2), and the loss and every
    gradient still equal unchunked training's in float64."""
    model = build_tiny_model("qwen2", dtype=torch.float64)
    seqs = make_sequences([CHUNK - 1] * 7, model.config.vocab_size)
    ref_loss, ref_grads = reference_loss_and_grads(model, seqs)
    model.zero_grad(set_to_none=True)
    stats = ds_chunkflow.chunked_step(model, seqs, chunk_size=CHUNK, keep_chunks=keep)
    assert stats.num_forwards == 7 and stats.num_backwards == -(-7 // keep), stats
    assert abs(stats.loss.item() - ref_loss.item()) / ref_loss.item() < 1e-10
    assert max_rel_err(grads_of(model), ref_grads) < 1e-10


def test_loads_through_from_pretrained(tmp_path):
    """A model saved and loaded back with from_pretrained trains exactly (the real loading path)."""
    model = build_tiny_model("llama", save_dir=tmp_path, dtype=torch.float64)
    seqs = make_sequences([50, 7, 3], model.config.vocab_size)
    assert max(_compare(model, seqs, 1, chunk_size=8)) < 1e-10


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7])
def test_tiny_chunks_and_boundaries(chunk_size):
    """Chunks of 1..7 tokens: every boundary label and position is right (N up to 40)."""
    model = build_tiny_model("qwen2", dtype=torch.float64)
    seqs = make_sequences([40, 2, 1, 13], model.config.vocab_size, mask_prompt=False)
    assert max(_compare(model, seqs, 2, chunk_size=chunk_size)) < 1e-10


def test_sliding_window_across_chunk_borders():
    """A sliding window (Mistral) that reaches across chunk borders is respected exactly."""
    model = build_tiny_model("mistral", dtype=torch.float64, sliding_window=20)
    seqs = make_sequences([100, 30, 8], model.config.vocab_size)
    assert max(_compare(model, seqs, 1, chunk_size=16)) < 1e-10


def test_hybrid_full_and_sliding_layers():
    """Qwen2 with per-layer full / sliding attention: each layer gets its own visibility."""
    model = build_tiny_model("qwen2", dtype=torch.float64, use_sliding_window=True, sliding_window=12,
                             layer_types=["full_attention", "sliding_attention"])
    seqs = make_sequences([70, 12, 5], model.config.vocab_size)
    assert max(_compare(model, seqs, 1, chunk_size=16)) < 1e-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_reference(dtype):
    """bf16 / fp16 inputs run and stay within low-precision distance of the reference."""
    model = build_tiny_model("llama", dtype=dtype)
    seqs = make_sequences([60, 10, 3], model.config.vocab_size)
    loss_err, grad_err = _compare(model, seqs, 1)
    assert loss_err < 1e-2 and grad_err < 5e-2, (loss_err, grad_err)


@dataclass
class SavedBytesMeter(ActivationMeter):
    """Also sums the bytes of every tensor kept on the device for backward, per tensor, as the
    offload path counts the ones it moves (parameters excluded in both)."""

    kept: int = 0

    def _acquire(self, t: torch.Tensor) -> object:
        self.kept += t.numel() * t.element_size()
        return super()._acquire(t)


def _far_tokens(lengths, keep):
    """Tokens of the chunks that are neither standalone nor among the last ``keep`` of their group."""
    return sum(min(CHUNK, n - i * CHUNK) for n in lengths if n > CHUNK for i in range(math.ceil(n / CHUNK) - keep))


def test_activation_offload_moves_the_far_chunks_saved_tensors():
    """Activation offload moves to the CPU exactly what the far chunks (all but the last K of each
    group) save for backward: every saved byte is kept or offloaded (kept + offloaded = what the
    K = N run keeps), the offloaded bytes shrink as K grows, are 0 for K >= N and at least one
    hidden state per layer per far token; loss and gradients equal the reference's, and bitwise
    those of the recompute run (K=1 without offload)."""
    model = build_tiny_model("qwen2")
    seqs = make_sequences(LENGTHS, model.config.vocab_size)
    model.zero_grad(set_to_none=True)
    ref_loss, ref_grads = reference_loss_and_grads(model, seqs)

    def run(keep, offload):
        model.zero_grad(set_to_none=True)
        meter = SavedBytesMeter()
        stats = ds_chunkflow.chunked_step(model, seqs, chunk_size=CHUNK, keep_chunks=keep,
                                          offload_activations=offload, meter=meter)
        assert stats.offloaded_bytes == meter.offloaded
        assert abs(stats.loss.item() - ref_loss.item()) / ref_loss.item() < TOL[torch.float32]
        assert max_rel_err(grads_of(model), ref_grads) < TOL[torch.float32]
        return stats, meter, grads_of(model)

    _, all_kept, _ = run(9, False)  # K = N of the longest group (9 chunks): every chunk keeps its activations
    recompute_stats, _, recompute_grads = run(1, False)
    assert recompute_stats.offloaded_bytes == 0
    offloaded = {}
    for keep in (1, 2, 3, 9):
        stats, meter, grads = run(keep, True)
        assert meter.kept + stats.offloaded_bytes == all_kept.kept, (keep, meter.kept, stats.offloaded_bytes)
        offloaded[keep] = stats.offloaded_bytes
        if keep == 1:
            assert stats.loss == recompute_stats.loss
            assert all(torch.equal(grads[n], recompute_grads[n]) for n in grads)
    assert offloaded[1] > offloaded[2] > offloaded[3] > offloaded[9] == 0, offloaded
    per_token = model.config.num_hidden_layers * model.config.hidden_size * 4
    assert offloaded[1] >= _far_tokens(LENGTHS, 1) * per_token, offloaded


def test_state_offload_moves_the_long_groups_state():
    """K/V state offload copies the state of exactly the groups of at least ``state_offload_min_tokens``
    tokens to and from the CPU: 0 bytes when no group qualifies, and per offloaded group at least every
    token's K/V written once plus every chunk's prefix read once; gradients stay bitwise those of the
    run without offload (and so match the reference)."""
    model = build_tiny_model("qwen2")
    seqs = make_sequences(LENGTHS, model.config.vocab_size)
    model.zero_grad(set_to_none=True)
    ref_loss, ref_grads = reference_loss_and_grads(model, seqs)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_bytes_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4  # K and V, float32

    def least(*lengths):
        """Each token's K/V written once, each chunk's prefix read once."""
        return kv_bytes_per_token * sum(n + sum(range(CHUNK, n, CHUNK)) for n in lengths)

    moved, base = {}, None
    for threshold in (None, 200, 132, 131, 100, 48, 18, 17, 0):
        model.zero_grad(set_to_none=True)
        stats = ds_chunkflow.chunked_step(model, seqs, chunk_size=CHUNK, keep_chunks=1,
                                          state_offload_min_tokens=threshold)
        grads = grads_of(model)
        if base is None:
            base = stats, grads
            assert abs(stats.loss.item() - ref_loss.item()) / ref_loss.item() < TOL[torch.float32]
            assert max_rel_err(grads, ref_grads) < TOL[torch.float32]
        assert stats.loss == base[0].loss and all(torch.equal(grads[n], base[1][n]) for n in grads), threshold
        moved[threshold] = stats.state_bytes_moved
    # dependent groups: 131 (9 chunks), 48 (3), 17 and 17 (2 each); each group's traffic is its own
    assert moved[None] == moved[200] == moved[132] == 0, moved
    assert moved[131] == moved[100] >= least(131), moved
    assert moved[48] == moved[18] and moved[18] - moved[100] >= least(48), moved
    assert moved[17] == moved[0] and moved[0] - moved[18] >= least(17, 17), moved


def test_dropout_is_replayed_on_recompute():
    """With attention dropout, K=1 (recompute) gives the same gradients as K=N under one seed."""
    model = build_tiny_model("llama", attention_dropout=0.3)
    model.train()
    seqs = make_sequences([80, 9], model.config.vocab_size)
    runs = []
    for keep in (1, 1, 100):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1234)
        ds_chunkflow.chunked_forward_backward(model, seqs, chunk_size=16, keep_chunks=keep)
        runs.append(grads_of(model))
    for other in runs[1:]:
        assert max_rel_err(other, runs[0]) < 1e-6
    model.zero_grad(set_to_none=True)
    torch.manual_seed(99)
    ds_chunkflow.chunked_forward_backward(model, seqs, chunk_size=16, keep_chunks=1)
    assert max_rel_err(grads_of(model), runs[0]) > 1e-3, "dropout had no effect"


def test_explicit_num_loss_tokens_scales_the_loss():
    """num_loss_tokens is the divisor (the engine passes the global batch's count)."""
    model = build_tiny_model("qwen2", dtype=torch.float64)
    seqs = make_sequences([40, 6], model.config.vocab_size)
    model.zero_grad(set_to_none=True)
    ref_loss, ref_grads = reference_loss_and_grads(model, seqs, num_loss_tokens=1000)
    model.zero_grad(set_to_none=True)
    loss = ds_chunkflow.chunked_forward_backward(model, seqs, chunk_size=16, num_loss_tokens=1000)
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert max_rel_err(grads_of(model), ref_grads) < 1e-10


def test_model_is_left_unchanged():
    """After a chunked step the model's attention setting and ordinary forward are untouched."""
    model = build_tiny_model("qwen2", dtype=torch.float64)
    seqs = make_sequences([40, 6], model.config.vocab_size)
    ids = seqs[0]["input_ids"][None]
    before = model(input_ids=ids).logits
    impl = model.config._attn_implementation
    ds_chunkflow.chunked_forward_backward(model, seqs, chunk_size=16)
    assert model.config._attn_implementation == impl
    assert torch.equal(model(input_ids=ids).logits, before)


def test_refuses_position_dependent_rope():
    """Dynamic RoPE scales with the longest position of a call: refused, never trained wrongly."""
    model = build_tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    seqs = make_sequences([40], model.config.vocab_size)
    with pytest.raises(NotImplementedError, match="dynamic"):
        ds_chunkflow.chunked_forward_backward(model, seqs, chunk_size=16)


def test_refuses_batch_without_labels():
    """A batch whose labels are all -100 has no loss to normalise: clear error."""
    model = build_tiny_model("qwen2")
    seqs = make_sequences([10, 4], model.config.vocab_size, all_masked={0, 1})
    with pytest.raises(ValueError, match="num_loss_tokens"):
        ds_chunkflow.chunked_forward_backward(model, seqs, chunk_size=16)


def test_activation_peak_follows_chunk_size():
    """With K=1 the activation peak at 16x chunk_size stays within 15% of the one at 4x."""
    model = build_tiny_model("qwen2", hidden_size=64)
    peaks = []
    for n in (4, 16):
        seqs = make_sequences([n * 64], model.config.vocab_size)
        meter = ActivationMeter()
        ds_chunkflow.chunked_forward_backward(model, seqs, chunk_size=64, keep_chunks=1, meter=meter)
        peaks.append(meter.peak)
    assert peaks[1] <= 1.15 * peaks[0], peaks


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_loss_never_holds_a_chunks_logits(tied):
    """At a large vocabulary the tensors saved for backward stay below half of one chunk's logits (the loss
    projects target rows piece by piece under checkpoint), and the result is exact, tied head or not."""
    model = build_tiny_model("qwen2", dtype=torch.float64, vocab_size=8192, hidden_size=32,
                             tie_word_embeddings=tied)
    seqs = make_sequences([3 * 64 + 5, 40, 20], model.config.vocab_size, mask_prompt=False)
    meter = ActivationMeter()
    loss_err, grad_err = _compare(model, seqs, 2, chunk_size=64, meter=meter, loss_piece_tokens=16)
    assert loss_err < 1e-10 and grad_err < 1e-10, (loss_err, grad_err)
    one_chunk_logits = 64 * model.config.vocab_size * 8  # float64; cross-entropy would save as much again
    assert 0 < meter.peak < one_chunk_logits / 2, (meter.peak, one_chunk_logits)  # measured: 0.16


def _count_backward_time_calls(module):
    """Forward calls of ``module`` made while autograd runs a backward: activation-checkpoint recomputes."""
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1) if torch._C._current_graph_task_id() != -1 else None)
    return calls


@pytest.mark.parametrize("keep", [1, 2, 9])
@pytest.mark.parametrize("how", ["chunkflow_all", "chunkflow_every_2", "hf_gradient_checkpointing"])
def test_layer_recompute_inside_chunks_is_exact(keep, how):
    """Activation checkpointing inside a chunk (ds_chunkflow's recompute_layers, or transformers' own
    gradient_checkpointing_enable) composes with chunking and K: exact, and exactly the checkpointed
    layers ran again during backward."""
    from ds_chunkflow.hf.model import enable_recompute

    model = build_tiny_model("llama", dtype=torch.float64, num_layers=2)
    if how == "hf_gradient_checkpointing":
        model.gradient_checkpointing_enable()
    else:
        assert enable_recompute(model, "all" if how == "chunkflow_all" else 2) == (2 if how == "chunkflow_all" else 1)
    model.train()
    seqs = make_sequences(LENGTHS, model.config.vocab_size, all_masked={8})
    model.zero_grad(set_to_none=True)
    ref_loss, ref_grads = reference_loss_and_grads(model, seqs)
    model.zero_grad(set_to_none=True)
    calls = [_count_backward_time_calls(layer.self_attn) for layer in model.model.layers]
    loss = ds_chunkflow.chunked_forward_backward(model, seqs, chunk_size=CHUNK, keep_chunks=keep)
    assert abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()) < 1e-10
    assert max_rel_err(grads_of(model), ref_grads) < 1e-10
    recomputed = [len(c) > 0 for c in calls]
    assert recomputed == [True, how != "chunkflow_every_2"], ([len(c) for c in calls], how)
