"""Spawned-rank functions for the data-parallel guard and family tests (importable by name)."""

import torch

from ds_chunkflow.testing.families import REFUSED, build, exact_case
from tests.helpers.workers import ds_config, gathered_state

DP_FAMILIES = ("deepseek_v3_mla", "gemma3_text", "mixtral", "granite", "qwen2_tied")
HYBRID_DP_FAMILIES = ("lfm2",)  # short conv: the mixer state carried across dependent chunks
# Mamba2 SSD beside attention in every layer; Mamba2 + shared attention blocks with tied weights (one K/V state per
# hybrid layer)
MAMBA_DP_FAMILIES = ("falcon_h1", "zamba2")


def dp_family_batch(vocab_size):
    from tests.helpers.reference import make_sequences

    return make_sequences([5 * 16 + 3, 21, 9, 4, 1], vocab_size, seed=11)


MOE_DP_FAMILIES = ("granitemoehybrid", "mixtral", "qwen2_moe")  # expert calls depend on the routing


def train_families(rank, world, stage, out_path, families=DP_FAMILIES, keep_chunks=2, zero_extra=None):
    """One SGD step per family under ZeRO-``stage``; rank 0 saves loss and gathered parameters."""
    import ds_chunkflow

    results = {}
    for family in families:
        model_type, _, overrides, _ = exact_case(family)
        model = build(model_type, overrides, dtype=torch.float32)
        config = ds_config(stage, keep_chunks=keep_chunks)
        config["zero_optimization"].update(zero_extra or {})
        engine, *_ = ds_chunkflow.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                             config=config)
        loss = engine.train_batch(dp_family_batch(model.config.vocab_size)).item()
        results[family] = {"loss": loss, "state": gathered_state(engine)}
    if rank == 0:
        torch.save(results, out_path)


def refused_everywhere(rank, world, stage, out_path):
    """A hybrid model under ZeRO-``stage``: every rank must raise ModelRefused from initialize."""
    import ds_chunkflow
    from ds_chunkflow.hf.guard import ModelRefused

    model_type, _, overrides, _ = REFUSED["opt"]
    model = build(model_type, overrides, dtype=torch.float32)
    try:
        ds_chunkflow.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                config=ds_config(stage))
    except ModelRefused as e:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        with open(f"{out_path}.{rank}", "w") as f:
            f.write(f"{e}\ngrads written: {len(grads)}")
