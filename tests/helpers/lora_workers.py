"""LoRA runs inside spawned ranks, and their single-process plain PEFT reference (importable by name)."""

import torch

from tests.helpers.workers import LR, ds_config, global_batch

RANK, ALPHA = 4, 8


def lora_model(seed=0):
    """The tiny Qwen2 with LoRA on every decoder Linear; A and B both random (PEFT's default B = 0 would
    leave A's gradient zero at the first step, hiding a lost one)."""
    from ds_chunkflow.hf.lora import apply_lora
    from ds_chunkflow.testing.models import build_tiny_model

    model = build_tiny_model("qwen2", seed=seed)
    torch.manual_seed(seed + 1)
    return apply_lora(model, r=RANK, alpha=ALPHA, init_lora_weights=False)


def _optimizer(model):
    from ds_chunkflow.hf.lora import trainable_parameters

    return torch.optim.SGD(trainable_parameters(model), lr=LR, momentum=0.9)


def _adapters(named):
    return {n: p.detach().clone().float().cpu() for n, p in named if "lora_" in n}


def train_lora(rank, world, stage, steps, out_path, chunkflow, adapter_dir, break_mode=None, long_len=None):
    """``steps`` SGD-momentum steps of the adapters on 2 ranks; saves the fp32 adapters before / after (the
    optimizer's masters), every module parameter after (gathered), and the saved adapter's directory.

    ``break_mode``: ``"unfreeze"`` trains the base as well; ``"drop_chunk"`` zeroes the adapters' gradient
    of the first chunk backward of each step (the tests must catch both). ``long_len``: as ``global_batch``'s."""
    import ds_chunkflow
    from ds_chunkflow.hf.lora import save_adapter
    from tests.helpers.workers import gathered_state

    model = lora_model()
    if break_mode == "unfreeze":
        for p in model.parameters():
            p.requires_grad_(True)
    engine, *_ = ds_chunkflow.initialize(model=model, optimizer=_optimizer(model), config=ds_config(stage, **chunkflow))
    if break_mode == "drop_chunk":
        _drop_first_chunk_grad(engine)
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    before = master_state_of(engine, trainable)
    losses = [engine.train_batch(global_batch(s, model.config.vocab_size, long_len)).item() for s in range(steps)]
    after = master_state_of(engine, trainable)
    module = gathered_state(engine)
    save_adapter(engine, adapter_dir)
    torch.save({"losses": losses, "before": before, "after": after, "module": module, "trainable": trainable,
                "metrics": engine.last_metrics}, f"{out_path}.{rank}")


def master_state_of(engine, names):
    """The fp32 master copy (or the parameter) of each named trainable parameter (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for n, p in engine.module.named_parameters():
        if n in names:
            master = safe_get_full_fp32_param(p)
            out[n] = (p if master is None else master).detach().clone().float().cpu()
    return out


def _drop_first_chunk_grad(engine):
    """A broken engine: the first chunk backward of each step contributes no adapter gradient (a hook
    zeroes the adapters' parameter gradients during that one backward)."""
    calls = {"n": 0}
    backward = engine.backward

    def broken(loss, *args, **kwargs):
        calls["n"] += 1
        handles = []
        if calls["n"] == 1:
            handles = [p.register_hook(torch.zeros_like) for n, p in engine.module.named_parameters()
                       if "lora_" in n]
        try:
            return backward(loss, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    step = engine.step

    def step_and_reset(*args, **kwargs):
        calls["n"] = 0
        return step(*args, **kwargs)

    engine.backward, engine.step = broken, step_and_reset


def reference_lora(steps, long_len=None):
    """Single process, plain PEFT: the same adapters, full-sequence forwards, sum CE / label tokens, the
    same SGD-momentum over the adapters only. Returns (losses, adapters before, adapters after, base after)."""
    from tests.helpers.reference import reference_loss_and_grads

    model = lora_model()
    opt = _optimizer(model)
    before = _adapters(model.named_parameters())
    losses = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, _ = reference_loss_and_grads(model, global_batch(s, model.config.vocab_size, long_len))
        opt.step()
        losses.append(loss.item())
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    return losses, before, _adapters(model.named_parameters()), base
