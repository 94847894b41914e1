"""Spawned-rank functions for tests/deepspeed/test_checkpoint.py (importable by name)."""

import json
import os
import shutil
import warnings

import torch

from tests.helpers.workers import _dataset, ds_config


def _engine(stage):
    import ds_chunkflow
    from ds_chunkflow.testing.models import build_tiny_model

    model = build_tiny_model("qwen2", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = ds_config(stage, data={"global_batch_size": 6, "seed": 5})
    return ds_chunkflow.initialize(model=model, optimizer=opt, config=config,
                                   training_data=_dataset(model.config.vocab_size))[0]


def train_and_save(rank, world, stage, ckpt_dir, out_path, total_steps, save_at):
    """``total_steps`` uninterrupted steps, saving a checkpoint after each step in ``save_at``."""
    engine = _engine(stage)
    losses = []
    for step in range(1, total_steps + 1):
        losses.append(engine.train_batch().item())
        if step in save_at:
            engine.save_checkpoint(ckpt_dir)
    if rank == 0:
        torch.save({"losses": losses}, out_path)


def resume_each(rank, world, stage, ckpt_dirs, out_path, total_steps):
    """For each directory: a fresh engine, ``load_checkpoint(dir)`` (no tag), then on to ``total_steps``.
    Records the tag loaded, the step, the warnings and the losses (or the error) per directory."""
    results = []
    for d in ckpt_dirs:
        engine = _engine(stage)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                engine.load_checkpoint(d)
            except Exception as e:  # noqa: BLE001 - reported to the test
                results.append({"error": f"{type(e).__name__}: {e}"})
                continue
        step = engine.global_steps
        losses = [engine.train_batch().item() for _ in range(total_steps - step)]
        results.append({"tag": engine.chunkflow_loaded_checkpoint.tag, "step": step, "losses": losses,
                        "warnings": [str(w.message) for w in caught if "ds_chunkflow" in str(w.message)]})
    torch.save(results, f"{out_path}.{rank}")


def damage(d, how):
    """Damages tag global_step3 of checkpoint directory ``d``; returns the reason a load must give."""
    from ds_chunkflow.deepspeed.checkpoint import MANIFEST

    tag = os.path.join(d, "global_step3")
    with open(os.path.join(tag, MANIFEST)) as f:
        files = json.load(f)["files"]
    rank1 = [f for f in files if f["rank"] == 1]
    assert rank1 and [f for f in files if f["rank"] == 0], files  # both ranks' files are listed
    if how == "truncate":  # one shard of rank 1 cut short (a crash while it was written)
        name = next(f["path"] for f in rank1 if "optim" in f["path"])
        with open(os.path.join(tag, name), "r+b") as f:
            f.truncate(1600)
        return f"truncated file {name} of rank 1"
    if how == "empty_latest":  # stock 0.19.8 killed as it wrote `latest` mid-save: no manifest either
        open(os.path.join(d, "latest"), "w").close()
        os.unlink(os.path.join(tag, MANIFEST))
        return "empty `latest` file"
    assert how == "delete", how
    for f in rank1:
        os.unlink(os.path.join(tag, f["path"]))
    return f"missing file {rank1[0]['path']} of rank 1"


def save_damage_resume(rank, world, stage, root, out_path, total_steps, cases):
    """One spawn: ``total_steps`` uninterrupted steps saving after steps 2 and 3 into ``root/base``;
    rank 0 copies it once per case and damages the step-3 tag (:func:`damage`); then
    :func:`resume_each` over the copies. Saves ``{out_path}.{rank}``."""
    import torch.distributed as dist

    base = os.path.join(root, "base")
    train_and_save(rank, world, stage, base, f"{out_path}.full", total_steps, (2, 3))
    reasons, error = [], None
    if rank == 0:
        try:
            with open(os.path.join(base, "latest")) as f:
                assert f.read() == "global_step3"
            for how in cases:
                shutil.copytree(base, os.path.join(root, how))
                reasons.append(damage(os.path.join(root, how), how))
        except Exception as e:  # noqa: BLE001 - raised on every rank below, so none waits forever
            error = f"{type(e).__name__}: {e}"
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise RuntimeError(f"damaging the checkpoint failed on rank 0: {box[0]}")
    resume_each(rank, world, stage, [os.path.join(root, how) for how in cases], f"{out_path}.res", total_steps)
    if rank == 0:
        torch.save({"full": torch.load(f"{out_path}.full")["losses"], "reasons": reasons,
                    "resumed": torch.load(f"{out_path}.res.0")}, f"{out_path}.0")
    else:
        torch.save({"resumed": torch.load(f"{out_path}.res.{rank}")}, f"{out_path}.{rank}")


def pipeline_save_damage_resume(rank, world, ckpt_dir, out_path):
    """2 pipeline stages, ZeRO-0: 3 steps saving after steps 1 and 2; rank 0 deletes rank 1's files of
    global_step2; a fresh engine loads (global_step1 expected) and trains steps 2 and 3 again."""
    import torch.distributed as dist

    import ds_chunkflow
    from ds_chunkflow.deepspeed.checkpoint import MANIFEST
    from tests.helpers.pipeline_workers import _pipeline_engine, build_model
    from tests.helpers.workers import global_batch

    ds_chunkflow.init_distributed()
    model = build_model("toy")
    engine = _pipeline_engine(model)
    vocab = model.config.vocab_size
    full = []
    for s in range(3):
        full.append(engine.train_batch(global_batch(s, vocab)).item())
        if s < 2:
            engine.save_checkpoint(ckpt_dir)
    tag = os.path.join(ckpt_dir, "global_step2")
    with open(os.path.join(tag, MANIFEST)) as f:
        files = json.load(f)["files"]
    dist.barrier()
    if rank == 0:
        for f in files:
            if f["rank"] == 1:
                os.unlink(os.path.join(tag, f["path"]))
    dist.barrier()
    engine = _pipeline_engine(build_model("toy"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.load_checkpoint(ckpt_dir)
    step = engine.global_steps
    resumed = [engine.train_batch(global_batch(s, vocab)).item() for s in range(step, 3)]
    torch.save({"files": files, "full": full, "tag": engine.chunkflow_loaded_checkpoint.tag, "step": step,
                "resumed": resumed, "warnings": [str(w.message) for w in caught if "ds_chunkflow" in str(w.message)]},
               f"{out_path}.{rank}")


def stock_save_then_chunkflow_load(rank, world, stage, ckpt_dir, out_path):
    """Plain ``deepspeed.initialize`` (no chunkflow section) trains 2 steps and saves as stock DeepSpeed
    does; a ChunkFlow engine with training data then loads that directory (no tag): the warnings, the
    step, the weights against the stock engine's, and one step trained after it."""
    import ds_chunkflow
    from ds_chunkflow.testing.models import build_tiny_model
    from tests.helpers.workers import gathered_state

    model = build_tiny_model("qwen2", seed=1)
    config = {k: v for k, v in ds_config(stage).items() if k != "chunkflow"}  # no section: plain DeepSpeed
    stock, *_ = ds_chunkflow.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                        config=config)  # (not deepspeed.initialize: that would build the shm op)
    assert not hasattr(stock, "chunkflow_config")
    data = _dataset(model.config.vocab_size)
    for step in range(2):
        ids = data[step]["input_ids"].unsqueeze(0)
        stock.backward(stock(input_ids=ids, labels=ids).loss)
        stock.step()
    stock.save_checkpoint(ckpt_dir)
    saved = gathered_state(stock)
    engine = _engine(stage)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.load_checkpoint(ckpt_dir)
    loaded = gathered_state(engine)
    same = all(torch.equal(saved[n], loaded[n]) for n in saved)
    loss = engine.train_batch().item()
    torch.save({"tag": engine.chunkflow_loaded_checkpoint.tag, "stock": engine.chunkflow_loaded_checkpoint.stock,
                "step": engine.global_steps, "same": same, "loss": loss, "files": sorted(os.listdir(
                    os.path.join(ckpt_dir, "global_step2"))),
                "warnings": [str(w.message) for w in caught if "ds_chunkflow" in str(w.message)]}, f"{out_path}.{rank}")
