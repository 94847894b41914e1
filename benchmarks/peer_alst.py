"""DeepSpeed ALST as a peer: Ulysses sequence parallelism for HF models, TiledMLP, tiled logits + loss.

    OMP_NUM_THREADS=1 python benchmarks/peer_alst.py --check    # exactness against a plain reference

What a DeepSpeed user tries first for long samples (DeepSpeed's ``ulysses-alst-sequence-parallelism``
tutorial), wired through DeepSpeed 0.19's public API only, sequence-parallel size 2 on 2 ranks
(data-parallel size 1: both ranks work on every sample, each on half of its tokens):

* ``UlyssesSPAttentionHF.register_with_transformers`` (after ``deepspeed.init_distributed``, before
  the model is built) -> ``mpu``, passed to ``deepspeed.initialize(mpu=...)`` with
  ``sequence_parallel_size: 2`` in the config;
* ``UlyssesSPDataLoaderAdapter`` over a plain ``DataLoader`` per rank: rank r's loader holds samples
  r, r + 2, ... of the global batch; the adapter all-gathers one sample of each rank and yields them
  in turn, sharded on the sequence: micro-batch i is sample i of the global batch (ChunkFlow's order);
* ``TiledMLP`` patched into ``Qwen2MLP.forward`` (the tutorial's shard count ceil(seqlen / hidden)),
  HF gradient checkpointing (non-reentrant), and ``TiledFusedLogitsLoss`` on the final hidden states
  (shards of ~1 GiB of float32 logits, the recipe's size), so no full logits tensor exists.

CPU facts (measured, /work/shared/notes/alst-on-cpu.md) and what this module does about them:

* gloo's all_gather rejects unequal shapes, and the adapter gathers samples of different lengths:
  ``ulysses_sp``'s ``dist`` is wrapped so that its ``all_gather`` pads, gathers and trims
  (:class:`PadGatherTrim`; everything else goes to ``deepspeed.comm`` unchanged);
* every sample's length must divide by the SP size: one pad token, label -100 (predicts nothing);
* SDPA drops the mask, so a packed row would attend across samples: one sample per micro-batch;
* the objective is ChunkFlow's ``sum CE / label tokens of the global batch``: each rank's shard loss
  is ``sum CE(shard) / N`` computed inside the loss function handed to ``TiledFusedLogitsLoss``
  (it back-propagates lm_head inside its forward and never rescales that gradient), divided by
  :data:`GRAD_SCALE_DIVISOR` (checked by ``--check`` against a plain single-process reference).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from _common import rss_bytes, targets_of  # noqa: E402

SP_SIZE = 2
LOGITS_SHARD_BYTES = 1 << 30  # TiledFusedLogitsLoss: about this many float32 logits bytes per shard
# What each rank's shard loss is divided by so that the summed gradients are those of the objective
# (DeepSpeed sums the gradients over the sequence-data-parallel group, and divides by dp size 1).
GRAD_SCALE_DIVISOR = 1


class PadGatherTrim:
    """``deepspeed.comm`` whose ``all_gather`` accepts tensors of different lengths on dim 1 over gloo:
    pad every rank's tensor to the longest, gather, copy each trimmed into the caller's list."""

    def __init__(self, comm):
        self._comm = comm

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):
        if all(t.shape == tensor.shape for t in tensor_list):
            return self._comm.all_gather(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(t.shape[1] for t in tensor_list)
        padded = torch.nn.functional.pad(tensor, (0, longest - tensor.shape[1]))
        buffers = [torch.empty_like(padded) for _ in tensor_list]
        self._comm.all_gather(buffers, padded, group=group)
        for out, buf in zip(tensor_list, buffers):
            out.copy_(buf[:, :out.shape[1]])


def install_cpu_fixes() -> None:
    """The gloo all_gather fix (above) and TiledMLP in Qwen2's MLP (the tutorial's monkey patch)."""
    import deepspeed.comm
    import deepspeed.runtime.sequence_parallel.ulysses_sp as ulysses_sp
    from transformers.models.qwen2 import modeling_qwen2

    if not isinstance(ulysses_sp.dist, PadGatherTrim):
        ulysses_sp.dist = PadGatherTrim(deepspeed.comm)
    modeling_qwen2.Qwen2MLP.forward = tiled_mlp_forward


def tiled_mlp_forward(self, x):
    """Qwen2MLP.forward through ``TiledMLP`` (ceil(seqlen / hidden) shards: every SP rank holds the same
    shard length, so the ranks agree without the tutorial's all_reduce)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    num_shards = max(1, math.ceil(x.shape[-2] / x.shape[-1]))

    def mlp(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    return TiledMLP.apply(mlp, self, x, num_shards, [self.gate_proj.weight, self.up_proj.weight,
                                                     self.down_proj.weight])


def alst_engine(model_dir: str, num_micro: int, optimizer_fn, zero_stage: int = 2):
    """(engine, RSS right after loading): DeepSpeed's order: init_distributed, register, build, initialize."""
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AutoModelForCausalLM

    from ds_chunkflow.deepspeed.deepspeed_adapter import decide_shm_comm_build

    decide_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    install_cpu_fixes()
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model_dir, core_attn_implementation="sdpa", sequence_parallel_size=SP_SIZE,
        micro_batch_size=1, seq_length_is_variable=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    load_rss = rss_bytes()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": num_micro, "gradient_clipping": 0.0,
              "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": zero_stage},
              "sequence_parallel_size": SP_SIZE, "steps_per_print": 10**9}
    engine = deepspeed.initialize(model=model, optimizer=optimizer_fn(model.parameters()), config=config, mpu=mpu)[0]
    return engine, load_rss


def even_batch(batch: list[dict], pad_id: int) -> list[dict]:
    """Samples padded to an even length (one pad token, label -100); an odd batch gets a 2-token filler
    without labels, because every SP rank's loader must hand the adapter one sample per micro-batch."""
    out = [s if len(s["input_ids"]) % SP_SIZE == 0 else
           {"input_ids": s["input_ids"] + [pad_id], "labels": s["labels"] + [-100]} for s in batch]
    return out + [{"input_ids": [pad_id] * SP_SIZE, "labels": [-100] * SP_SIZE}] * (len(out) % SP_SIZE)


def sp_loader(batch: list[dict], rank: int, mpu):
    """The adapter over rank ``rank``'s plain loader (samples rank, rank + 2, ... one per batch)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter
    from torch.utils.data import DataLoader

    def collate(items):
        (s,) = items
        n = len(s["input_ids"])
        return {"input_ids": torch.tensor([s["input_ids"]]), "labels": torch.tensor([s["labels"]]),
                "position_ids": torch.arange(n).unsqueeze(0)}

    dl = DataLoader(batch[rank::SP_SIZE], batch_size=1, collate_fn=collate)
    return UlyssesSPDataLoaderAdapter(dl, sp_rank=mpu.get_sequence_parallel_rank(),
                                      sp_group=mpu.get_sequence_parallel_group(),
                                      sp_world_size=mpu.get_sequence_parallel_world_size(), device="cpu")


def alst_step(engine, mpu, batch: list[dict], pad_id: int) -> float:
    """One optimizer step over ``batch`` (every sample through both ranks); returns the global loss."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    batch = even_batch(batch, pad_id)
    n_loss = sum(sum(t != -100 for t in targets_of(s["labels"])) for s in batch)
    model = engine.module
    lm_head, vocab = model.lm_head, model.config.vocab_size

    def loss_fn(head, x, y):  # normalised inside: TiledFusedLogitsLoss never rescales lm_head's gradient
        return F.cross_entropy(head(x).float(), y, ignore_index=-100, reduction="sum") / (n_loss * GRAD_SCALE_DIVISOR)

    total = 0.0
    for mb in sp_loader(batch, dist.get_rank(), mpu):
        hidden = model.model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False)[0]
        shards = max(1, math.ceil(hidden.shape[1] * vocab * 4 / LOGITS_SHARD_BYTES))
        loss = TiledFusedLogitsLoss.apply(loss_fn, lm_head, hidden, mb["shift_labels"], None, shards,
                                          [lm_head.weight], "sum")
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        total += loss.item() * GRAD_SCALE_DIVISOR
    t = torch.tensor([total], dtype=torch.float64)
    dist.all_reduce(t, group=mpu.get_sequence_parallel_group())
    return t.item()


def alst_worker(rank, world, cfg, warmup, batches, out_prefix):
    """bench_peers' ALST run: one warm-up step, then the timed global batches (records as bench_engine's)."""
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning)
    t = time.perf_counter()
    engine, load_rss = alst_engine(cfg["model_dir"], SP_SIZE * math.ceil(len(warmup) / SP_SIZE),
                                   lambda ps: torch.optim.AdamW(ps, lr=cfg["lr"], weight_decay=0.0), cfg["zero_stage"])
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    rec = {"init_s": time.perf_counter() - t, "rss_after_load": load_rss, "rss_after_init": rss_bytes(),
           "step_s": [], "cpu_s": [], "losses": [], "tokens": []}
    rec["warmup_loss"] = alst_step(engine, mpu, warmup, cfg["pad_id"])
    for batch in batches:
        dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        rec["losses"].append(alst_step(engine, mpu, batch, cfg["pad_id"]))
        rec["cpu_s"].append(time.process_time() - c)
        dist.barrier()
        rec["step_s"].append(time.perf_counter() - t)
        rec["tokens"].append(sum(len(s["input_ids"]) for s in even_batch(batch, cfg["pad_id"])))
    rec["peak_rss"] = rss_bytes()
    Path(f"{out_prefix}.{rank}").write_text(json.dumps(rec))


def summarise_alst(ranks, batches) -> dict:
    """bench_peers' row for ALST (the columns of its HF rows)."""
    tokens = sum(len(s["input_ids"]) for b in batches for s in b)
    wall = sum(ranks[0]["step_s"])
    cpu = sum(max(r["cpu_s"][i] for r in ranks) for i in range(len(batches)))
    mib = 2**20
    return {"system": "alst", "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu,
            "s_per_step": wall / len(batches), "optimizer_steps": len(batches) + 1, "timed_steps": len(batches),
            "peak_rss_mib": max(r["peak_rss"] for r in ranks) / mib,
            "load_rss_mib": max(r["rss_after_load"] for r in ranks) / mib,
            "train_rss_mib": max(r["peak_rss"] - r["rss_after_init"] for r in ranks) / mib,
            "computed_per_real": sum(ranks[0]["tokens"]) / tokens, "tokens_truncated": 0, "samples_dropped": 0,
            "tokens_trained_extra": 0, "gradient_checkpointing": True, "losses": ranks[0]["losses"],
            "warmup_loss": ranks[0]["warmup_loss"], "step_s": ranks[0]["step_s"],
            "init_s": max(r["init_s"] for r in ranks), "per_rank_peak_rss_mib": [r["peak_rss"] / mib for r in ranks]}


# ----------------------------------------------------------------------------- exactness check
SGD_LR = 1024.0
def _check_worker(rank, world, model_dir, batch, pad_id, out_prefix):
    """One ALST step with SGD(lr 1024) under ZeRO-2: the parameter change is -1024 x the gradient (a large
    power of two, so float32 rounding of ``p - lr g`` stays far below the gradient, e.g. for norm weights 1)."""
    engine, _ = alst_engine(model_dir, SP_SIZE * math.ceil(len(batch) / SP_SIZE),
                            lambda ps: torch.optim.SGD(ps, lr=SGD_LR), zero_stage=2)
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    loss = alst_step(engine, mpu, batch, pad_id)
    grads = {n: ((before[n] - p.detach()) / SGD_LR).tolist() for n, p in engine.module.named_parameters()}
    if rank == 0:
        Path(out_prefix).write_text(json.dumps({"loss": loss, "grads": grads}))


def reference(model_dir: str, batch: list[dict]):
    """Plain transformers, one process, full sequences, eager attention: sum CE / label tokens."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.train()
    n = sum(sum(t != -100 for t in targets_of(s["labels"])) for s in batch)
    loss = 0.0
    for s in batch:
        logits = model(input_ids=torch.tensor([s["input_ids"]]), use_cache=False).logits[0]
        loss = loss + F.cross_entropy(logits, torch.tensor(targets_of(s["labels"])), ignore_index=-100,
                                      reduction="sum") / n
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


def check(world: int = 2) -> float:
    """ALST's loss and every gradient against :func:`reference`; returns the worst relative difference."""
    import os
    import tempfile

    from bench_engine import MODEL, long_sample

    from ds_chunkflow.testing.models import build_tiny_model
    from ds_chunkflow.testing.spawn import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(MODEL, tie_word_embeddings=False)
        build_tiny_model(spec.pop("family"), **spec, seed=0, save_dir=tmp)
        batch = [long_sample(n, seed=n) for n in (301, 96, 157)]  # odd lengths, odd count: pads and a filler
        run_ranks(_check_worker, tmp, batch, 0, os.path.join(tmp, "alst.json"), world=world, timeout=600)
        got = json.loads(Path(tmp, "alst.json").read_text())
        ref_loss, ref_grads = reference(tmp, batch)
    worst, worst_name = abs(got["loss"] - ref_loss) / abs(ref_loss), "loss"
    print(f"loss: alst {got['loss']:.8f} reference {ref_loss:.8f} (relative {worst:.2e})")
    for name, g in ref_grads.items():
        diff = (torch.tensor(got["grads"][name]) - g).abs().max().item() / g.abs().max().item()
        worst = max(worst, diff)
        if diff >= worst:
            worst_name = name
    print(f"worst relative difference over loss and {len(ref_grads)} gradients (max abs diff / max abs): "
          f"{worst:.2e} ({worst_name})")
    return worst


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="ALST against a plain reference (loss, every gradient)")
    if p.parse_args().check:
        sys.exit(0 if check() < 1e-5 else 1)
