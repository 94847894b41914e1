"""Evaluation workers, run inside spawned ranks (must be importable by name)."""

import torch

from tests.helpers.workers import LR, ds_config, gathered_state, global_batch


def eval_set(vocab_size: int):
    """Packed short samples, two longer than a chunk (16 tokens), one without a label token."""
    from tests.helpers.reference import make_sequences

    return make_sequences([5, 9, 70, 3, 33, 17, 2, 41, 12, 8, 6], vocab_size, seed=11, all_masked=(3,))


def eval_matches(rank, world, stage, out_path, chunkflow=None):
    """Evaluation loss of a tiny Qwen2 through the engine, before and after one training step;
    rank 0 also saves the engine's module parameters (the reference recomputes the plain loss)."""
    import ds_chunkflow
    from ds_chunkflow.testing.models import build_tiny_model

    model = build_tiny_model("qwen2", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    engine, *_ = ds_chunkflow.initialize(model=model, optimizer=opt, config=ds_config(stage, **(chunkflow or {})))
    data = eval_set(model.config.vocab_size)
    losses = [engine.evaluate(data)]
    engine.train_batch(global_batch(0, model.config.vocab_size))
    losses.append(engine.evaluate(data, batch_samples=4))  # several planned batches
    params = gathered_state(engine)
    if rank == 0:
        torch.save({"losses": losses, "params": params, "last_eval": engine.last_eval}, out_path)


def train_with_evals(rank, world, stage, steps, evaluate, out_path):
    """``steps`` training steps with dropout on, with an evaluation before every step or none; rank 0
    saves the losses and the parameters."""
    import ds_chunkflow
    from ds_chunkflow.testing.models import build_tiny_model

    model = build_tiny_model("qwen2", seed=0, attention_dropout=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    engine, *_ = ds_chunkflow.initialize(model=model, optimizer=opt, config=ds_config(stage, keep_chunks=2))
    torch.manual_seed(1234)
    data = eval_set(model.config.vocab_size)
    losses = []
    for s in range(steps):
        if evaluate:
            engine.evaluate(data)
        losses.append(engine.train_batch(global_batch(s, model.config.vocab_size)).item())
    params = gathered_state(engine)
    if rank == 0:
        torch.save({"losses": losses, "params": params}, out_path)
