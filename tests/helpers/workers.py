"""Functions run inside spawned ranks (must be importable by name)."""

import contextlib

import torch

CHUNK = 16
LR = 0.5  # train_steps / reference_steps SGD-momentum: large, so the updates stand far above bf16 noise


def global_batch(step: int, vocab_size: int, long_len: int | tuple[int, int] | None = None):
    """7 short sequences and two split ones; ``long_len``: the first split one has that many tokens
    (a dominant sample, which the cost model spreads over ranks when sequence parallelism is on), or
    a pair: both split ones' lengths."""
    from tests.helpers.reference import make_sequences

    g = torch.Generator().manual_seed(100 + step)
    split = tuple(long_len) if isinstance(long_len, (tuple, list)) else (long_len or CHUNK * 5 + 3, CHUNK * 2 + 1)
    lengths = [int(x) for x in torch.randint(1, 24, (7,), generator=g)] + list(split)
    return make_sequences(lengths, vocab_size, seed=step)


def ds_config(stage: int, **chunkflow):
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
        "chunkflow": {"chunk_size": CHUNK, "keep_chunks": 1, **chunkflow},
    }


def gathered_state(engine):
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {n: p.detach().clone().float() for n, p in engine.module.named_parameters()}


def master_state(engine):
    """Every parameter in float32 as the optimizer holds it: the fp32 master copy where DeepSpeed keeps
    one (ZeRO-1/2/3, bf16), else the parameter itself (collective: call on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for n, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p)
        out[n] = (p if master is None else master).detach().clone().float().cpu()
    return out


@contextlib.contextmanager
def recorded_exec_stats():
    """Records ``(offloaded_bytes, state_bytes_moved)`` of every ``Executor.run`` in this process,
    as the executor returned them (this rank's own counts, before the engine reduces anything)."""
    from ds_chunkflow.runtime.executor import Executor

    run, records = Executor.run, []

    def spy(self, plan):
        stats = run(self, plan)
        records.append((stats.offloaded_bytes, stats.state_bytes_moved))
        return stats

    Executor.run = spy
    try:
        yield records
    finally:
        Executor.run = run


def train_steps(rank, world, stage, steps, out_path, chunkflow=None, extra=None, model_kwargs=None, long_len=None):
    """``steps`` SGD-momentum steps; every rank saves ``{out_path}.{rank}``: the losses, the fp32
    parameters before and after (``master_state``), the module's parameters and their dtype, the
    last step's metrics and this rank's own byte counts of the last step (``recorded_exec_stats``)."""
    import ds_chunkflow
    from ds_chunkflow.testing.models import build_tiny_model

    model = build_tiny_model("qwen2", seed=0, **(model_kwargs or {}))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    config = {**ds_config(stage, **(chunkflow or {})), **(extra or {})}
    engine, *_ = ds_chunkflow.initialize(model=model, optimizer=opt, config=config)
    before = master_state(engine)
    with recorded_exec_stats() as moved:
        losses = [engine.train_batch(global_batch(s, model.config.vocab_size, long_len)).item() for s in range(steps)]
    torch.save({"losses": losses, "before": before, "after": master_state(engine), "module": gathered_state(engine),
                "dtype": next(engine.module.parameters()).dtype, "metrics": engine.last_metrics,
                "moved": moved[-1]}, f"{out_path}.{rank}")


def reference_steps(steps, model=None, long_len=None):
    """Single process, plain PyTorch: the same model (default: the tiny Qwen2), SGD-momentum and global batches."""
    from ds_chunkflow.testing.models import build_tiny_model
    from tests.helpers.reference import reference_loss_and_grads

    model = model if model is not None else build_tiny_model("qwen2", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, _ = reference_loss_and_grads(model, global_batch(s, model.config.vocab_size, long_len))
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _dataset(vocab_size):
    from ds_chunkflow.data.jsonl import SFTDataset
    from tests.helpers.reference import make_sequences

    g = torch.Generator().manual_seed(7)
    lengths = [int(x) for x in torch.randint(1, 30, (40,), generator=g)] + [70, 45, 100]
    return SFTDataset(make_sequences(lengths, vocab_size, seed=3))


def train_with_resume(rank, world, ckpt_dir, out_path, total_steps, stop_at):
    """Runs total_steps uninterrupted, or stop_at steps + checkpoint + a fresh engine resuming."""
    import ds_chunkflow
    from ds_chunkflow.testing.models import build_tiny_model

    def make_engine():
        model = build_tiny_model("qwen2", seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        config = ds_config(2, data={"global_batch_size": 6, "seed": 5})
        return ds_chunkflow.initialize(model=model, optimizer=opt, config=config,
                                       training_data=_dataset(model.config.vocab_size))[0]

    engine = make_engine()
    losses = [engine.train_batch().item() for _ in range(stop_at)]
    if stop_at < total_steps:
        engine.save_checkpoint(ckpt_dir)
        engine = make_engine()
        engine.load_checkpoint(ckpt_dir)
        losses += [engine.train_batch().item() for _ in range(total_steps - stop_at)]
    if rank == 0:
        torch.save({"losses": losses, "steps": engine.global_steps}, out_path)


def mismatched_batches(rank, world, out_path):
    """Ranks given different global batches: every rank must raise, none may hang."""
    import ds_chunkflow
    from ds_chunkflow.testing.models import build_tiny_model
    from tests.helpers.reference import make_sequences

    model = build_tiny_model("qwen2", seed=0)
    engine, *_ = ds_chunkflow.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         config=ds_config(3))
    seqs = make_sequences([20, 30 + 5 * rank], model.config.vocab_size)
    try:
        engine.train_batch(seqs)
    except RuntimeError as e:
        with open(f"{out_path}.{rank}", "w") as f:
            f.write(str(e))



def zero3_live_graphs(rank, world, out_path, fixed, keep_chunks=8):
    """One ZeRO-3 step with every chunk graph alive (K = N), with or without ds_chunkflow's ZeRO-3 fix
    (``fixed=False`` runs the executor with no-op graph hooks). Saves the update, the reference-able
    before/after state, and, at each chunk backward's arrival at decoder layer 0 (its input gradient),
    how many parameters of layers 1.. were still gathered."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    import ds_chunkflow
    from ds_chunkflow.deepspeed import engine as engine_module
    from ds_chunkflow.runtime.executor import GraphHooks
    from ds_chunkflow.testing.models import build_tiny_model

    if not fixed:
        engine_module.Zero3LiveGraphs = lambda engine: GraphHooks()
    model = build_tiny_model("qwen2", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    config = ds_config(3, keep_chunks=keep_chunks)
    # no prefetch, nothing persistent: what stays gathered is what the hooks failed to release
    config["zero_optimization"].update(stage3_prefetch_bucket_size=0, stage3_param_persistence_threshold=0)
    engine, *_ = ds_chunkflow.initialize(model=model, optimizer=opt, config=config)
    layers = engine.module.model.layers
    later = [p for layer in layers[1:] for p in layer.parameters()]
    still_gathered = []

    def watch(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.requires_grad:
            hidden.register_hook(lambda g: still_gathered.append(
                sum(p.ds_status == ZeroParamStatus.AVAILABLE for p in later)))

    layers[0].register_forward_pre_hook(watch, with_kwargs=True)
    before = master_state(engine)
    losses = [engine.train_batch(global_batch(0, model.config.vocab_size)).item()]
    torch.save({"losses": losses, "before": before, "after": master_state(engine), "still_gathered": still_gathered,
                "num_later": len(later), "metrics": engine.last_metrics}, f"{out_path}.{rank}")


def train_loaded(rank, world, model_dir, out_path, chunkflow, bf16=False, steps=3):
    """Loads ``model_dir`` with ``ds_chunkflow.load_pretrained`` for a ZeRO-3 config (partitioned at load),
    records this rank's share of the parameter elements and their dtype right after loading, then trains
    ``steps`` SGD-momentum steps like ``train_steps``."""
    import ds_chunkflow

    config = ds_config(3, **chunkflow)
    if bf16:
        config["bf16"] = {"enabled": True}
    model = ds_chunkflow.load_pretrained(model_dir, config)
    loaded_in_eval_mode = not model.training  # transformers' from_pretrained returns eval mode
    params = list(model.parameters())
    share = sum(p.ds_tensor.numel() for p in params) / sum(p.ds_numel for p in params)
    dtypes = {str(p.ds_tensor.dtype) for p in params}
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    engine, *_ = ds_chunkflow.initialize(model=model, optimizer=opt, config=config)
    before = master_state(engine)
    losses = [engine.train_batch(global_batch(s, model.config.vocab_size)).item() for s in range(steps)]
    torch.save({"share": share, "dtypes": dtypes, "losses": losses, "before": before, "after": master_state(engine),
                "metrics": engine.last_metrics, "loaded_in_eval_mode": loaded_in_eval_mode,
                "trained_in_train_mode": engine.module.training}, f"{out_path}.{rank}")


def train_with_skipped_lines(rank, world, data_path, out_path):
    """One step from a JSONL loaded with on_error="skip"; saves the step's metrics."""
    import ds_chunkflow
    from ds_chunkflow.data.hf_data import load_sft_data
    from ds_chunkflow.testing.models import build_tiny_model
    from ds_chunkflow.testing.tokenizer import build_tokenizer

    model = build_tiny_model("qwen2", seed=0, vocab_size=512)
    data = load_sft_data(data_path, build_tokenizer(), on_error="skip", vocab_size=512,
                         cache_dir=f"{out_path}.cache")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = ds_chunkflow.initialize(model=model, optimizer=opt, training_data=data,
                                         config=ds_config(2, data={"global_batch_size": 2}))
    engine.train_batch()
    torch.save(engine.last_metrics, f"{out_path}.{rank}")
