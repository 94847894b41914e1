"""Data-parallel mode (2 gloo ranks): families beyond Llama train exactly, hybrids are refused on every rank."""

import pytest
import torch

from ds_chunkflow.testing.families import build, exact_case
from ds_chunkflow.testing.spawn import run_ranks
from tests.helpers.guard_workers import (
    DP_FAMILIES,
    HYBRID_DP_FAMILIES,
    MAMBA_DP_FAMILIES,
    MOE_DP_FAMILIES,
    dp_family_batch,
    refused_everywhere,
    train_families,
)
from tests.helpers.reference import reference_loss_and_grads

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("stage", [2, 3])
def test_families_match_reference_under_zero(stage, tmp_path):
    """MLA, sliding/full + per-layer-type RoPE, MoE, multipliers, tied embeddings: after one SGD step
    (K=2, packed + split chunks over 2 ranks) loss and every parameter equal the plain reference's."""
    out = tmp_path / "families.pt"
    run_ranks(train_families, stage, str(out))
    assert_matches_reference(torch.load(out), DP_FAMILIES)


def test_hybrids_match_reference_under_zero3(tmp_path):
    """LFM2 (short conv) under ZeRO-3, K=1 (recompute): after one SGD step the mixer state carried across
    dependent chunks (and restarted in packed ones) gives the plain reference's loss and parameters."""
    out = tmp_path / "hybrids.pt"
    run_ranks(train_families, 3, str(out), HYBRID_DP_FAMILIES, 1)
    assert_matches_reference(torch.load(out), HYBRID_DP_FAMILIES)


def test_mamba_families_match_reference_under_zero3(tmp_path):
    """Falcon-H1 (Mamba2 SSD beside attention in every layer) and Zamba2 (Mamba2 + shared attention blocks with tied
    weights) under ZeRO-3, K=1 (recompute): after one SGD step the conv and SSM states carried across dependent chunks
    (and restarted in packed ones) give the plain reference's loss and parameters."""
    out = tmp_path / "mamba.pt"
    run_ranks(train_families, 3, str(out), MAMBA_DP_FAMILIES, 1, timeout=150)
    assert_matches_reference(torch.load(out), MAMBA_DP_FAMILIES)


def test_moe_under_zero3_with_every_parameter_partitioned(tmp_path):
    """MoE blocks whose expert calls depend on the routing (Granite MoE) under ZeRO-3 with nothing persistent
    and no prefetch, K=2: no rank waits on another (they hung before the blocks became ZeRO-3 leaves:
    ds_chunkflow.deepspeed.deepspeed_adapter.zero3_leaf_moe_blocks), and each matches the plain reference."""
    out = tmp_path / "moe.pt"
    run_ranks(train_families, 3, str(out), MOE_DP_FAMILIES, 2,
              {"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0}, timeout=150)
    assert_matches_reference(torch.load(out), MOE_DP_FAMILIES)


def test_attention_sinks_under_zero3(tmp_path):
    """GPT-OSS (attention sinks, sliding / full layers, MoE) under ZeRO-3, K=2: after one SGD step loss and every
    parameter equal the plain reference's, the sinks included (their gradient flows through the chunk attention
    to the partitioned parameter)."""
    out = tmp_path / "gpt_oss.pt"
    run_ranks(train_families, 3, str(out), ("gpt_oss",), 2)
    got = torch.load(out)
    assert_matches_reference(got, ("gpt_oss",))
    model_type, _, overrides, _ = exact_case("gpt_oss")
    init = dict(build(model_type, overrides, dtype=torch.float32).named_parameters())
    sinks = [n for n in got["gpt_oss"]["state"] if n.endswith(".sinks")]
    assert sinks and all((got["gpt_oss"]["state"][n] - init[n]).abs().max() > 1e-4 for n in sinks)


def assert_matches_reference(got, families):
    for family in families:
        model_type, _, overrides, _ = exact_case(family)
        model = build(model_type, overrides, dtype=torch.float32)
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        loss, _ = reference_loss_and_grads(model, dp_family_batch(model.config.vocab_size))
        opt.step()
        assert abs(got[family]["loss"] - loss.item()) / abs(loss.item()) < 1e-5, family
        for name, p in model.named_parameters():  # the update, so a zero gradient cannot pass
            ref = p.detach() - init[name]
            if ref.abs().max() == 0:  # e.g. an expert no probe token was routed to
                continue
            # allowed: 1e-4 of the update, plus the float32 rounding of parameter - init
            allowed = 1e-4 * ref.abs().max() + 4 * torch.finfo(torch.float32).eps * init[name].abs().max()
            err = (got[family]["state"][name] - init[name] - ref).abs().max()
            assert err <= allowed, (family, name, (err / ref.abs().max()).item())


def test_refused_on_every_rank_under_zero3(tmp_path):
    """OPT (refused inside the probe: its forward never runs its base model) under ZeRO-3: initialize raises
    ModelRefused on both ranks (no hang), before any gradient, with that reason (not an internal TypeError)."""
    out = tmp_path / "refused"
    run_ranks(refused_everywhere, 3, str(out), timeout=120)
    for r in range(2):
        text = (tmp_path / f"refused.{r}").read_text()
        assert "OPTForCausalLM" in text and "never runs its base model" in text and "grads written: 0" in text
