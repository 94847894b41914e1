"""A weighted data mix trained inside spawned ranks, uninterrupted and resumed (importable by name)."""

import torch

from tests.helpers.workers import ds_config


def _mix(vocab_size):
    from ds_chunkflow.data.jsonl import SFTDataset
    from ds_chunkflow.data.mix import MixedDataset
    from tests.helpers.reference import make_sequences

    class Recording(MixedDataset):
        """Records which (source, local index) every global batch read."""

        def __getitem__(self, index):
            k = int(self.source_of(index))
            self.read.append((self.names[k], int(index - self.offsets[k])))
            return super().__getitem__(index)

    a = SFTDataset(make_sequences([5, 9, 13, 20, 7, 40, 11, 3], vocab_size, seed=1))
    b = SFTDataset(make_sequences([30, 6, 17, 8, 25, 12], vocab_size, seed=2))
    mix = Recording({"a": a, "b": b}, weights=[3, 1])
    mix.read = []
    return mix


def _run(ckpt_dir, steps, stop_at):
    import ds_chunkflow
    from ds_chunkflow.testing.models import build_tiny_model

    def make():
        model = build_tiny_model("qwen2", seed=0)
        data = _mix(model.config.vocab_size)
        engine = ds_chunkflow.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                         training_data=data,
                                         config=ds_config(2, data={"global_batch_size": 5, "seed": 4}))[0]
        return engine, data

    (engine, data), batches, losses = make(), [], []
    for step in range(steps):
        if step == stop_at:
            engine.save_checkpoint(ckpt_dir)
            engine, data = make()
            engine.load_checkpoint(ckpt_dir)
        data.read.clear()
        losses.append(engine.train_batch().item())
        batches.append(list(data.read))
    metrics = {k: v for k, v in engine.last_metrics.items() if k.startswith("data_drawn_")}
    return {"batches": batches, "losses": losses, "metrics": metrics, "epoch": engine.chunkflow_sampler.epoch}


def mix_with_resume(rank, world, root, out_path, steps, stop_at):
    full = _run(f"{root}/ckpt_full", steps, steps)
    resumed = _run(f"{root}/ckpt", steps, stop_at)
    if rank == 0:
        torch.save(full, f"{out_path}.full")
        torch.save(resumed, f"{out_path}.resumed")
