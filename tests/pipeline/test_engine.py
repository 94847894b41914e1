"""ChunkFlow's pipeline engine on 2 stages (gloo) against the single-process reference.

Also what pipeline mode refuses at wrap time, and how one failing rank ends every rank.
"""

import time

import pytest
import torch

from ds_chunkflow.hf.guard import PROBE_TOLERANCE, check_model
from ds_chunkflow.pipeline.model import ChunkSlot, pipe_layers, pipeline_module, self_check
from ds_chunkflow.testing.families import build
from ds_chunkflow.testing.spawn import run_ranks
from tests.helpers.pipeline_workers import (
    INJECTED,
    PIPE_FAMILIES,
    TOY,
    fails_on_one_stage,
    pipeline_refuses_zero2,
    planning_errors_agree,
    reference_steps,
    train_pipeline,
)

pytestmark = pytest.mark.distributed

def assert_matches_reference(parts, family, steps, tol=1e-5):
    """Every rank's losses and the union of the ranks' parameters equal the reference after ``steps``."""
    ref_losses, ref_state = reference_steps(family, steps)
    state = {}
    for p in parts:
        for a, b in zip(p[family]["losses"], ref_losses, strict=True):
            assert abs(a - b) / abs(b) < tol, (family, p[family]["losses"], ref_losses)
        for name, t in p[family]["state"].items():
            if name in state:  # replicas of a stage, or a tied weight on the first and last stage: must agree
                assert torch.allclose(state[name], t, rtol=0, atol=tol * t.abs().max().item()), (family, name)
            state[name] = t
    assert state.keys() == ref_state.keys(), family
    for name, ref in ref_state.items():
        err = (state[name] - ref).abs().max() / ref.abs().max()
        assert err < tol, (family, name, err.item())


def load_parts(out, world=2):
    return [torch.load(f"{out}.{r}") for r in range(world)]


@pytest.mark.parametrize("stage, keep", [(0, 1), (1, 2)])
def test_two_stages_match_reference(stage, keep, tmp_path):
    """Losses and all parameters after 3 steps (packed + split chunks, recompute) match to 1e-5."""
    out = tmp_path / "pipe"
    run_ranks(train_pipeline, stage, 3, str(out), keep)
    parts = load_parts(out)
    assert parts[0][TOY]["losses"] == parts[1][TOY]["losses"], "stages report different losses"
    assert_matches_reference(parts, TOY, 3)


def test_activation_offload_matches_reference(tmp_path):
    """offload.activations: far in pipeline mode: the chunks beyond K are forwarded once with their saved
    tensors on the CPU (bytes counted on both stages) and never recomputed; losses and parameters match."""
    out = tmp_path / "pipe"
    run_ranks(train_pipeline, 0, 2, str(out), 1, (TOY,), "far")
    parts = load_parts(out)
    assert_matches_reference(parts, TOY, 2)
    for p in parts:
        metrics = p[TOY]["metrics"]
        assert metrics["offloaded_bytes"] > 0 and metrics["recomputed_chunks"] == 0, metrics


def test_families_match_reference(tmp_path):
    """Llama, tied Qwen2, sliding Mistral, Granite (multipliers), tied Cohere (logit scale), tied Gemma 3
    (final softcap, rotary per layer type, sliding), Qwen3 and the hybrid Qwen3-Next (gated delta nets whose
    recurrent state each stage carries across dependent chunks): losses and parameters after 2 steps match."""
    out = tmp_path / "pipe"
    run_ranks(train_pipeline, 0, 2, str(out), 1, tuple(PIPE_FAMILIES), timeout=400)
    parts = load_parts(out)
    for family in PIPE_FAMILIES:
        assert_matches_reference(parts, family, 2)


def test_zero2_is_refused_with_a_clear_error(tmp_path):
    """Pipeline + ZeRO-2 stops with a ConfigError naming zero_optimization.stage on every rank."""
    out = tmp_path / "err"
    run_ranks(pipeline_refuses_zero2, str(out))
    for r in range(2):
        assert "zero_optimization.stage: 2" in (tmp_path / f"err.{r}").read_text()


def test_two_stages_times_two_replicas_match_reference(tmp_path):
    """4 ranks = 2 stages x 2 data-parallel replicas: chunks split over replicas, same parameters as the reference."""
    out = tmp_path / "pipe"
    run_ranks(train_pipeline, 1, 2, str(out), 1, world=4, timeout=400)
    assert_matches_reference(load_parts(out, world=4), TOY, 2)


# (model, what the refusal must say)
REFUSALS = {
    # multiplies embeddings and logits in its forward; not in FORWARD_EXTRAS: caught by the model guard,
    # whose probe computes the logits through the chunked loss's head path
    "hyperclovax": (lambda: build("hyperclovax", dict(embedding_multiplier=2.0, logits_scaling=0.5),
                                  dtype=torch.float32),
                    ["HyperCLOVAXForCausalLM", "does something after its decoder that ChunkFlow's chunked loss"]),
    # RoPE that depends on the longest position of a call: refused by the model guard
    "llama_dynamic_rope": (lambda: build("llama", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                        "rope_theta": 10000.0}),
                                         dtype=torch.float32),
                           ["LlamaForCausalLM", "depends on the longest position"]),
    # another layout: model.gpt_neox.embed_in / layers / final_layer_norm and embed_out
    "gpt_neox": (lambda: build("gpt_neox", dict(rotary_pct=0.5), dtype=torch.float32),
                 ["GPTNeoXForCausalLM", "needs a decoder-only model with model.embed_tokens"]),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_wrapper_refuses_what_it_cannot_reproduce(case):
    """pipeline_module refuses, at wrap time and before any collective, a model it would run inexactly."""
    make, phrases = REFUSALS[case]
    model = make()
    model.train()
    with pytest.raises(NotImplementedError) as info:
        pipeline_module(model, num_stages=2)
    for phrase in phrases:
        assert phrase in str(info.value), str(info.value)
    assert model.training, "the self-check must restore train mode"


def test_wrapper_takes_attention_softcap_and_sinks():
    """Gemma 2 with attention softcapping (its default) and GPT-OSS (attention sinks) pass what pipeline_module
    checks at wrap time (the guard, then the pipe layers' self-check): the chunk attention computes both."""
    for model in (build("gemma2", dict(head_dim=16), dtype=torch.float32),
                  build("gpt_oss", dict(head_dim=16, experts_implementation="eager"), dtype=torch.float32)):
        check_model(model, allow_recurrent_mixers=False)
        slot = ChunkSlot()
        assert self_check(model, pipe_layers(model, slot), slot) <= PROBE_TOLERANCE[torch.float32]


def test_planning_errors_stop_every_rank(tmp_path):
    """A sample over max_seq_len on rank 0 only, then different batches per rank: every rank raises, none hangs."""
    out = tmp_path / "err"
    run_ranks(planning_errors_agree, str(out), timeout=120)
    texts = [(tmp_path / f"err.{r}").read_text().splitlines() for r in range(2)]
    assert texts[0][0].startswith("ValueError: sample 1 of the global batch has 50 tokens"), texts[0]
    assert texts[1][0].startswith("RuntimeError: another"), texts[1]
    for lines in texts:
        assert len(lines) == 2 and "were given different global batches" in lines[1], lines


def test_error_on_one_stage_ends_every_rank_quickly(capfd):
    """An exception in rank 0's layer while rank 1 waits in a receive: both processes exit 1, fast, with the
    rank and the message on stderr."""
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"ranks exited with \[1, 1\]"):  # neither was killed by the harness
        run_ranks(fails_on_one_stage, timeout=120)
    assert time.perf_counter() - start < 60
    err = capfd.readouterr().err
    assert "rank 0 failed while running the pipeline schedule" in err and INJECTED in err, err[-3000:]
    assert "rank 1 failed while running the pipeline schedule" in err, err[-3000:]
