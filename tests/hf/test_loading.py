"""ds_chunkflow.load_pretrained: a checkpoint partitioned at load under ZeRO-3, then trained exactly."""

import pytest
import torch

from ds_chunkflow.hf.loading import training_dtype
from ds_chunkflow.testing.models import build_tiny_model
from ds_chunkflow.testing.spawn import run_ranks
from tests.deepspeed.test_engine import update_errors
from tests.helpers.workers import reference_steps, train_loaded


def test_training_dtype_follows_the_config():
    """bf16 / fp16 when the config enables them, else fp32."""
    assert training_dtype({}) == torch.float32
    assert training_dtype({"bf16": {"enabled": True}}) == torch.bfloat16
    assert training_dtype({"fp16": {"enabled": True}}) == torch.float16
    assert training_dtype({"bf16": {"enabled": False}}) == torch.float32


@pytest.mark.distributed
def test_zero3_load_is_partitioned_and_trains_exactly(tmp_path):
    """2 ranks, ZeRO-3: right after from_pretrained each rank holds about half the parameter elements (never
    the whole model), in fp32; then K=2 and activation offload train it to the plain reference's updates,
    with no chunk recomputed."""
    model_dir = tmp_path / "model"
    build_tiny_model("qwen2", seed=0, save_dir=model_dir)
    out = tmp_path / "loaded.pt"
    run_ranks(train_loaded, str(model_dir), str(out), {"keep_chunks": 2, "offload": {"activations": "far"}})
    results = [torch.load(f"{out}.{r}") for r in range(2)]
    for r in results:
        # from_pretrained hands over an eval-mode model; train_batch trains it in train mode (dropout, recompute)
        assert r["loaded_in_eval_mode"] and r["trained_in_train_mode"]
        assert 0.45 < r["share"] < 0.56, r["share"]  # measured: 0.50 (partitions are padded per parameter)
        assert r["dtypes"] == {"torch.float32"}
        assert r["metrics"]["recomputed_chunks"] == 0 and r["metrics"]["offloaded_bytes"] > 0
    from transformers import AutoModelForCausalLM

    ref_losses, ref_after = reference_steps(3, model=AutoModelForCausalLM.from_pretrained(model_dir,
                                                                                          dtype=torch.float32))
    for a, b in zip(results[0]["losses"], ref_losses):
        assert abs(a - b) / abs(b) < 1e-5, (results[0]["losses"], ref_losses)
    per_param, _ = update_errors(results[0], ref_after)
    assert max(per_param.values()) < 2e-5, max(per_param.items(), key=lambda kv: kv[1])


@pytest.mark.distributed
def test_zero3_load_in_bf16_when_the_config_says_so(tmp_path):
    """With bf16.enabled the checkpoint is loaded (partitioned) in bf16: no fp32 copy of the model is built."""
    model_dir = tmp_path / "model"
    build_tiny_model("qwen2", seed=0, save_dir=model_dir)
    out = tmp_path / "loaded.pt"
    run_ranks(train_loaded, str(model_dir), str(out), {}, True, 1)
    results = [torch.load(f"{out}.{r}") for r in range(2)]
    assert all(r["dtypes"] == {"torch.bfloat16"} and 0.45 < r["share"] < 0.56 for r in results), results
