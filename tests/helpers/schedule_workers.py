"""Learning-rate schedules inside spawned ranks: a ChunkFlow run (with a resume) and plain DeepSpeed."""

import torch

from tests.helpers.workers import ds_config, global_batch

LR = 0.01
SCHEDULES = {
    "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": 4, "warmup_type": "linear"},
    "WarmupDecayLR": {"total_num_steps": 5, "warmup_min_lr": LR / 10, "warmup_max_lr": LR, "warmup_num_steps": 3,
                      "warmup_type": "linear"},
    "WarmupCosineLR": {"total_num_steps": 5, "warmup_num_steps": 2, "warmup_min_ratio": 0.1, "cos_min_ratio": 0.01,
                       "warmup_type": "linear"},
}


def _model():
    from ds_chunkflow.testing.models import build_tiny_model

    return build_tiny_model("qwen2", seed=0)


def plain_deepspeed_lrs(kind, steps):
    """The learning rate each optimizer step of a plain ``deepspeed.initialize`` run applies."""
    import deepspeed

    model = _model()
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 2}, "scheduler": {"type": kind, "params": SCHEDULES[kind]}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config)
    lrs = []
    for s in range(steps):
        ids = global_batch(s, model.config.vocab_size)[0]["input_ids"][None]
        engine.backward(engine(input_ids=ids).logits.float().mean())
        lrs.append(engine.get_lr()[0])
        engine.step()
    return lrs, engine.lr_scheduler.last_batch_iteration


def chunkflow_lrs(kind, steps, stop_at, ckpt_dir):
    """``lr`` from the step metrics of a ChunkFlow run that stops after ``stop_at`` steps, saves, and a fresh
    engine resumes from the checkpoint."""
    import ds_chunkflow

    def make():
        model = _model()
        config = {**ds_config(2, keep_chunks=2), "scheduler": {"type": kind, "params": SCHEDULES[kind]}}
        return ds_chunkflow.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                       config=config)[0]

    engine, lrs = make(), []
    for s in range(steps):
        if s == stop_at:
            engine.save_checkpoint(ckpt_dir)
            engine = make()
            engine.load_checkpoint(ckpt_dir)
        engine.train_batch(global_batch(s, engine.module.config.vocab_size))
        lrs.append(engine.last_metrics["lr"])
    return lrs, engine.lr_scheduler.last_batch_iteration


def compare_schedules(rank, world, ckpt_root, out_path, steps, stop_at):
    results = {}
    for kind in SCHEDULES:
        results[kind] = {"plain": plain_deepspeed_lrs(kind, steps),
                         "chunkflow": chunkflow_lrs(kind, steps, stop_at, f"{ckpt_root}/{kind}")}
    torch.save(results, f"{out_path}.{rank}")
