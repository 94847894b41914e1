"""Export workers, run inside spawned ranks (must be importable by name)."""

import torch

from tests.helpers.workers import ds_config, global_batch


def train_and_export(rank, world, stage, tied, bf16, out_dir, tokenizer_dir=None):
    """Two AdamW steps, a checkpoint and an in-training export of the same step (``final``) with the
    default dtype, and one in float32 (``final_fp32``)."""
    import ds_chunkflow
    from ds_chunkflow.testing.models import build_tiny_model

    model = build_tiny_model("qwen2", seed=0, tie_word_embeddings=tied)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = ds_config(stage, keep_chunks=2)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
    if bf16:
        config["bf16"] = {"enabled": True}
        model = model.to(torch.bfloat16)
    engine, *_ = ds_chunkflow.initialize(model=model, optimizer=opt, config=config)
    tokenizer = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        engine.chunkflow_tokenizer = tokenizer
    for s in range(2):
        engine.train_batch(global_batch(s, model.config.vocab_size))
    engine.save_checkpoint(f"{out_dir}/ckpt")
    ds_chunkflow.save_pretrained(engine, f"{out_dir}/final", tokenizer=tokenizer, max_shard_size=20_000)
    ds_chunkflow.save_pretrained(engine, f"{out_dir}/final_fp32", dtype="float32")


def train_lora_and_export(rank, world, stage, out_dir):
    """Two SGD steps of LoRA adapters (ZeRO ``stage``, nothing persistent), then the adapter directory
    (``adapter``) and the merged model (``merged``)."""
    import ds_chunkflow
    from tests.helpers.lora_workers import _optimizer, lora_model

    model = lora_model()
    config = ds_config(stage, keep_chunks=2)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engine, *_ = ds_chunkflow.initialize(model=model, optimizer=_optimizer(model), config=config)
    for s in range(2):
        engine.train_batch(global_batch(s, model.config.vocab_size))
    ds_chunkflow.save_pretrained(engine, f"{out_dir}/adapter")
    ds_chunkflow.save_pretrained(engine, f"{out_dir}/merged", merge_lora=True)
