"""ChunkFlow's pipeline engine on 2 stages (gloo) against the single-process reference."""

import pytest
import torch
from distributed import run_ranks
from workers import pipeline_refuses_zero2, reference_steps, train_pipeline

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("stage, keep", [(0, 1), (1, 2)])
def test_two_stages_match_reference(stage, keep, tmp_path):
    """Losses and all parameters after 3 steps (packed + split chunks, recompute) match to 1e-5."""
    out = tmp_path / "pipe"
    run_ranks(train_pipeline, stage, 3, str(out), keep)
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    ref_losses, ref_state = reference_steps(3)
    for a, b in zip(parts[0]["losses"], ref_losses):
        assert abs(a - b) / abs(b) < 1e-5, (parts[0]["losses"], ref_losses)
    assert parts[0]["losses"] == parts[1]["losses"], "stages report different losses"
    state = {**parts[0]["state"], **parts[1]["state"]}
    assert state.keys() == ref_state.keys()
    for name, ref in ref_state.items():
        err = (state[name] - ref).abs().max() / ref.abs().max()
        assert err < 1e-5, (name, err.item())


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
    parts = [torch.load(f"{out}.{r}") for r in range(4)]
    ref_losses, ref_state = reference_steps(2)
    for p in parts:
        for a, b in zip(p["losses"], ref_losses):
            assert abs(a - b) / abs(b) < 1e-5, (p["losses"], ref_losses)
    state = {}
    for p in parts:
        for name, t in p["state"].items():
            if name in state:  # replicas hold the same stage: they must agree
                assert torch.allclose(state[name], t, rtol=0, atol=1e-6), name
            state[name] = t
    assert state.keys() == ref_state.keys()
    for name, ref in ref_state.items():
        err = (state[name] - ref).abs().max() / ref.abs().max()
        assert err < 1e-5, (name, err.item())
