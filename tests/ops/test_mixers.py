"""Hybrid models (:mod:`ds_chunkflow.ops.mixers`): recurrent mixers restart at every packed sequence and carry
their state, and its gradient, across dependent chunks, exactly (float64, against :mod:`reference`)."""

import pytest
import torch

import ds_chunkflow
from ds_chunkflow.hf.guard import ModelRefused, check_model
from ds_chunkflow.ops import mixers
from ds_chunkflow.runtime.chunk import ChunkRuntime
from ds_chunkflow.testing.families import build, exact_case
from tests.helpers.exactness import chunked_errors
from tests.helpers.reference import make_sequences

HYBRIDS = ["lfm2", "qwen3_next", "granitemoehybrid", "bamba", "nemotron_h", "jamba",
           "lfm2_moe", "falcon_h1", "zamba", "zamba2", "mamba", "mamba2", "falcon_mamba", "recurrent_gemma",
           "rwkv"]
CHUNK = 8


def _model(family):
    model_type, _, overrides, tol = exact_case(family)
    return build(model_type, overrides), tol


def _errors(model, seqs, **options):
    return chunked_errors(model, seqs, CHUNK, **options)

@pytest.mark.parametrize("family", HYBRIDS)
def test_packed_sequences_restart_the_mixer(family):
    """Three sequences packed into one chunk train as three separate runs: no mixer state crosses a boundary."""
    model, tol = _model(family)
    seqs = make_sequences([3, 2, 3], model.config.vocab_size, seed=3)
    assert max(_errors(model, seqs)) < tol


@pytest.mark.parametrize("keep", [1, 2, 5])
@pytest.mark.parametrize("family", HYBRIDS)
def test_split_sequence_carries_state_and_its_gradient(family, keep):
    """One sequence split into 5 dependent chunks (the last of one token) trains as one run, for K = 1, 2, N."""
    model, tol = _model(family)
    seqs = make_sequences([4 * CHUNK + 1], model.config.vocab_size, seed=4)
    assert max(_errors(model, seqs, keep_chunks=keep)) < tol


@pytest.mark.parametrize("family", ["lfm2", "qwen3_next", "granitemoehybrid", "jamba", "lfm2_moe", "falcon_h1",
                                    "zamba", "zamba2", "mamba", "mamba2", "falcon_mamba", "recurrent_gemma", "rwkv"])
def test_activation_offload_and_layer_recompute_stay_exact(family):
    """Far chunks offloaded to the CPU, and transformers' layer checkpointing recomputing a mixer inside its
    chunk's backward: the gradient still reaches the state of the chunk before (Jamba's layer calls its mixer
    without the layer's kwargs: the recompute still finds its chunk)."""
    model, tol = _model(family)
    seqs = make_sequences([37, 5, 3], model.config.vocab_size, seed=5)
    assert max(_errors(model, seqs, keep_chunks=1, offload_activations=True)) < tol
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert max(_errors(model, seqs, keep_chunks=2)) < tol


@pytest.mark.parametrize("family", ["lfm2", "qwen3_next", "granitemoehybrid", "jamba", "lfm2_moe", "falcon_h1",
                                    "zamba", "zamba2", "mamba", "falcon_mamba", "recurrent_gemma", "rwkv"])
def test_a_lost_state_or_state_gradient_would_be_caught(family, monkeypatch):
    """The tests above are sensitive: starting every chunk from zero moves loss and gradients far beyond the
    tolerance (and the guard's probe refuses it), dropping the gradient the next chunk sends back moves the gradients
    (the probe, forward only, cannot see that one)."""
    model, tol = _model(family)
    seqs = make_sequences([37], model.config.vocab_size, seed=6)
    with monkeypatch.context() as m:
        m.setattr(mixers.MixerStates, "start", lambda self, name, position: {})
        with pytest.raises(ModelRefused, match="differs from its own forward"):
            check_model(model)
    check_model(model)  # the verdict is cached: what follows reaches the training step
    with monkeypatch.context() as m:
        m.setattr(mixers.MixerStates, "start", lambda self, name, position: {})
        assert max(_errors(model, seqs)) > 1e3 * tol
    pending = mixers.MixerStates.pending_grads
    monkeypatch.setattr(mixers.MixerStates, "pending_grads",
                        lambda self, name, position, keys: [None for _ in pending(self, name, position, keys)])
    loss_err, grad_err = _errors(model, seqs)
    assert loss_err < tol and grad_err > 1e3 * tol


@pytest.mark.parametrize("family", ["zamba", "zamba2"])
def test_shared_attention_keeps_one_state_per_hybrid_layer(family, monkeypatch):
    """Zamba's shared attention blocks, one per hybrid layer, all built with one layer_idx: each keeps its own K/V
    state (keyed by its hybrid layer's index for the step, restored after). Sharing one key, a later layer's keys
    overwrite an earlier one's and the split sequence's gradients move far beyond the tolerance."""
    from ds_chunkflow.hf import transformers_adapter

    model, tol = _model(family)
    attns = transformers_adapter.shared_attention_indices(model)
    built_with = [a.layer_idx for a, _ in attns]
    assert len(attns) == 2 and len(set(built_with)) == 1 and len({i for _, i in attns}) == 2
    seqs = make_sequences([37, 5], model.config.vocab_size, seed=7)
    assert max(_errors(model, seqs, keep_chunks=2)) < tol
    assert [a.layer_idx for a, _ in attns] == built_with
    monkeypatch.setattr(transformers_adapter, "shared_attention_indices", lambda model: [])
    assert max(_errors(model, seqs, keep_chunks=2)) > 1e3 * tol


def test_rwkv_carried_state_never_goes_through_the_cuda_kernel(monkeypatch):
    """RWKV's CUDA kernel returns no gradient for its start state: a piece with a state runs transformers' torch
    recurrence instead. Here a stand-in kernel (the torch recurrence on a detached state) replaces the module's
    dispatch; the split sequence still trains exactly."""
    import transformers.models.rwkv.modeling_rwkv as rwkv

    torch_path = rwkv.rwkv_linear_attention_cpu

    def kernel(time_decay, time_first, key, value, state=None, return_state=False):
        state = None if state is None else [s.detach() for s in state]
        return torch_path(time_decay, time_first, key, value, state=state, return_state=return_state)

    monkeypatch.setattr(rwkv, "rwkv_linear_attention", kernel)
    model, tol = _model("rwkv")
    assert max(_errors(model, make_sequences([37, 5, 3], model.config.vocab_size, seed=8), keep_chunks=2)) < tol


def test_mixer_state_per_boundary_is_constant_in_the_sample_length(monkeypatch):
    """LFM2: one chunk boundary costs one conv window per conv layer ([hidden, L_cache] float64), however long
    the sample; with K=1 every boundary is held until the recomputes reach it; all is freed by the last backward."""
    model, _ = _model("lfm2")
    seen = []
    release = ChunkRuntime.release

    def spy(self, group):
        states = self.states[group].mixers
        seen.append((states.bytes_per_boundary, states.peak_bytes, states.nbytes))
        release(self, group)

    monkeypatch.setattr(ChunkRuntime, "release", spy)
    for n in (3 * CHUNK, 6 * CHUNK):
        ds_chunkflow.chunked_forward_backward(model, make_sequences([n], model.config.vocab_size), chunk_size=CHUNK)
    convs = [m.conv for _, m in mixers.supported_mixers(model)]
    per_boundary = sum(c.in_channels * c.kernel_size[0] * 8 for c in convs)
    (short, short_peak, short_left), (long, long_peak, long_left) = seen
    assert short == long == per_boundary
    # N chunks: N-1 boundaries held, plus at the first recompute the leaf (and its gradient) of the chunk after
    # it and its own leaf: N + 2 states
    assert (short_peak, long_peak) == (5 * per_boundary, 8 * per_boundary)
    assert short_left == long_left == 0


def test_step_reports_the_mixer_state_per_boundary():
    """The step's statistics (the engine's metric mixer_state_bytes_per_boundary) carry that per-boundary cost."""
    from ds_chunkflow import chunked_step

    model, _ = _model("lfm2")
    stats = chunked_step(model, make_sequences([3 * CHUNK, 5], model.config.vocab_size), chunk_size=CHUNK)
    per_boundary = sum(m.conv.in_channels * m.conv.kernel_size[0] * 8 for _, m in mixers.supported_mixers(model))
    assert stats.mixer_state_bytes == per_boundary > 0


def test_mixers_are_restored_after_the_step():
    """Outside the chunked step every mixer runs its own forward again (no adapter left behind)."""
    model, _ = _model("lfm2")
    ds_chunkflow.chunked_forward_backward(model, make_sequences([20, 3], model.config.vocab_size), chunk_size=CHUNK)
    assert all("forward" not in vars(m) for _, m in mixers.supported_mixers(model))
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_mixer_outside_a_chunked_forward_is_an_error():
    """With the adapters on, a mixer called outside the model's forward (no chunk layout) raises, never guesses."""
    model, _ = _model("lfm2")
    name, conv = mixers.supported_mixers(model)[0]
    with mixers.use_chunkflow_mixers(model), pytest.raises(RuntimeError, match="outside the model's forward"):
        conv(torch.zeros(1, 4, model.config.hidden_size, dtype=torch.float64))


def test_pipeline_engine_refuses_a_hybrid_it_cannot_cut():
    """pipeline_module refuses at wrap time a hybrid whose decoder lacks the layout its stages are cut from (LFM2:
    no rotary_emb under model), naming what it needs (hybrids it can cut carry their mixer state: tests/pipeline)."""
    from ds_chunkflow.pipeline.model import pipeline_module

    model_type, _, overrides, _ = exact_case("lfm2")
    model = build(model_type, overrides, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="Lfm2ForCausalLM: pipeline mode needs a decoder-only model"):
        pipeline_module(model, num_stages=2)
