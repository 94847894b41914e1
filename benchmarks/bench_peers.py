"""ChunkFlow against the tools users would pick instead: TRL's SFTTrainer, the HF Trainer, DeepSpeed ALST.

    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py            # full (13.4 min measured, 2 shared cores)
    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py --quick    # smoke run (5.4 min measured, 2 shared cores)
    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py --systems chunkflow,trl_padding_free,alst \
        --out peers_alst.json                                     # the ALST run (9.5 min measured, load 7-10)

One run, 2 gloo ranks (DeepSpeed's CPU accelerator, spawned by ``ds_chunkflow.testing.spawn``),
ZeRO-2, fp32, AdamW (lr 1e-3, no weight decay, constant lr, no clipping), the same tiny random
Qwen2 (``build_tiny_model``, ``save_pretrained``, every system loads it with ``from_pretrained``,
SDPA) and the same data as ``bench_engine.py`` (its ``make_batches`` / ``long_sample``: stock-
template chats tokenised by the toy tokenizer, assistant-only labels, optionally a synthetic
long sample per batch). Every system first trains one warm-up global batch, then ``--steps``
timed global batches of ``--global_batch`` samples; the dataset handed to TRL / Trainer is
exactly those samples, in that order, pre-tokenised (``input_ids`` + ``labels``):

* ``chunkflow``         ``ds_chunkflow.initialize`` + ``engine.train_batch(batch)`` (bench_engine's
                        worker), chunk_size ``--chunk_size``, keep_chunks 1; ``chunkflow_k4``: keep_chunks
                        4; ``chunkflow_sp``: keep_chunks 1 with ``sequence_parallel.max_size: 2``;
                        ``chunkflow_sp_k4``: both;
* ``trainer_padded``    ``transformers.Trainer(deepspeed=ds_config)``, ``DataCollatorForSeq2Seq``
                        (pads to the longest sample of the micro-batch), ``train_sampling_strategy=
                        "sequential"``; per_device ``--trainer_micro_batch`` (b) x grad accumulation
                        G x 2 ranks = global batch (default 1 x 16 x 2 = 32). Accelerate hands
                        micro-batch k to rank k % 2, so optimizer step s trains samples
                        [32 s, 32 s + 32): ChunkFlow's global batch s. b = 1 means no padding
                        at all (each sample alone, SDPA ``is_causal``): on this data b = 2 pads
                        the 14K-token sample's partner to 14K and CPU SDPA with a padding mask
                        holds [b, heads, L, L] scores (measured: 3.1 GiB at b = 2, L = 8K, one rank);
* ``trl_padding_free``  ``trl.SFTTrainer(padding_free=True, packing=False)``, per_device 16 x G 1 x 2
                        = 32, sequential: the same global batches; each rank's 16 samples are
                        flattened into one row with position_ids restarting per sample;
* ``trl_bfd``           ``trl.SFTTrainer(packing=True, packing_strategy="bfd")`` (padding-free is
                        implied), ``max_length`` = the longest sample (so BFD truncates nothing;
                        counted), per_device 1 packed row, Trainer's default random row order.
                        TRL packs the whole dataset, not each global batch: the run trains the
                        same samples, but a step holds whatever rows the sampler draws, and the
                        step count is ceil(rows / 2) / G with G = rows // (2 (steps + 1)), at least 1
                        (recorded: with no truncation there are fewer rows than 2 x steps);
* ``alst``              DeepSpeed's long-sequence recipe (``peer_alst.py``): Ulysses SP 2 on the 2 ranks
                        (data-parallel 1) through ``UlyssesSPAttentionHF.register_with_transformers`` and
                        ``UlyssesSPDataLoaderAdapter``, TiledMLP, gradient checkpointing,
                        ``TiledFusedLogitsLoss``; one sample per micro-batch (SDPA), every sample of the
                        global batch in turn on both ranks, the same objective (``peer_alst.py --check``).

TRL 1.16 has no flash-attn requirement for padding-free: its collator returns position_ids and
cu_seq_lens (no attention_mask); on CPU the model runs SDPA, and transformers 5 turns the
restarting position_ids into a block-diagonal mask (the full row x row score matrix is computed).
TRL enables gradient checkpointing by default (``--trl_no_checkpointing`` turns it off); Trainer
does not. Loss normalisation (read from the code, checked by comparing losses to ChunkFlow's):
ChunkFlow divides the summed CE by the label tokens of the global batch. Trainer 5.24
(``average_tokens_across_devices=True``, ``model_accepts_loss_kwargs``) counts
``labels[..., 1:] != -100`` over the G micro-batches of a step, all-gathers and sums that over
ranks (``num_items_in_batch``), each micro-batch's loss is sum CE / that count, multiplied by the
world size (DeepSpeed averages gradients over ranks, ``scale_wrt_gas=False``): the same objective.
TRL's SFTTrainer uses its fused LM head (tiled lm_head + log-softmax, no full logits) with the same
``num_items_in_batch`` division and world-size factor; its padding-free collator sets the label at
every sample start to -100 (the token an earlier sample's last position would predict).

Columns: ``tokens_per_s`` real (non-pad) tokens trained in the timed steps over their wall clock
(barrier at every step end; an HF step runs from one step end to the next, so it includes its
data loading and collation, as ``train_batch`` does its chunking); ``tokens_per_cpu_s`` the same
over the sum of each step's slowest rank's CPU time (robust to other jobs on the machine);
``peak_rss_mib`` max over ranks of ``ru_maxrss``; ``computed_per_real`` token slots computed
(padding included) per real token; ``tokens_truncated`` / ``samples_dropped`` input minus what
the system's dataset holds; ``tokens_trained_extra`` tokens trained beyond the input (accelerate's
``even_batches`` repeats rows to give both ranks the same count); ``max_loss_diff`` against
ChunkFlow over the steps that trained the same batches. Writes benchmarks/results/peers.json
(``--quick``: peers_quick.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]
from _common import load_samples, rss_bytes, save_json, table  # noqa: E402
from bench_engine import MODEL, data_stats, long_sample, make_batches, run_system, summarise  # noqa: E402
from peer_alst import alst_worker, summarise_alst  # noqa: E402

SYSTEMS = ("chunkflow", "chunkflow_k4", "chunkflow_sp", "chunkflow_sp_k4", "trainer_padded", "trl_padding_free",
           "trl_bfd", "alst")
PEERS = SYSTEMS[4:]
CHUNKFLOW_VARIANTS = {"chunkflow": "K = 1", "chunkflow_k4": "K = 4 (fewer recomputes, more memory)",
                      "chunkflow_sp": "K = 1, sequence_parallel.max_size 2 (a dominant sample spread over both ranks)",
                      "chunkflow_sp_k4": "K = 4, sequence_parallel.max_size 2"}
ATTENTION = {
    "chunkflow": "ds_chunkflow 'chunkflow' attention: SDPA per packed sample / dependent chunk with K/V state",
    "trainer_padded": "sdpa; DataCollatorForSeq2Seq pads to the micro-batch's longest (attention_mask)",
    "trl_padding_free": "sdpa; TRL DataCollatorForLanguageModeling(padding_free) -> position_ids, "
                        "transformers builds a block-diagonal mask",
    "trl_bfd": "sdpa; TRL BFD-packed rows + padding-free collator -> position_ids, block-diagonal mask",
    "alst": "DeepSpeed Ulysses SP 2 around sdpa (is_causal, full sample after the all-to-all), one sample per "
            "micro-batch; TiledMLP, gradient checkpointing, TiledFusedLogitsLoss",
}
LOSS = {
    "chunkflow": "sum CE / label tokens of the global batch",
    "trainer_padded": "sum CE / num_items_in_batch (labels[...,1:] != -100 over the step's micro-batches, "
                      "summed over ranks) x world size; DeepSpeed averages over ranks",
    "trl_padding_free": "TRL fused LM head: sum(-log_probs) / num_items_in_batch x world size (as Trainer)",
    "trl_bfd": "TRL fused LM head: sum(-log_probs) / num_items_in_batch x world size (as Trainer)",
    "alst": "sum CE of each rank's shard / label tokens of the global batch, inside TiledFusedLogitsLoss; "
            "DeepSpeed sums the SP ranks' gradients",
}


# ----------------------------------------------------------------------------- inside a rank (HF systems)
def ds_config(zero_stage: int) -> dict:
    """The ds_config every HF system passes as ``TrainingArguments(deepspeed=...)``."""
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": zero_stage}, "bf16": {"enabled": False}, "fp16": {"enabled": False},
            "steps_per_print": 10**9}


def cpu_deepspeed_state() -> None:
    """Accelerate's state for DeepSpeed on CPU ranks, made before ``TrainingArguments``.

    accelerate 1.15 picks no backend on a machine without an accelerator unless ``use_cpu=True``,
    and then sees one process (TrainingArguments' own path: DeepSpeed initialises gloo, accelerate
    reports ``num_processes=1`` and DeepSpeed's batch check fails); ``use_cpu=True`` drops DeepSpeed
    for DDP. Given ``backend="gloo"`` with ``ACCELERATE_USE_DEEPSPEED`` set, it lets DeepSpeed
    initialise gloo and counts the ranks; ``use_configured_state`` makes the Trainer keep it.
    """
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")


def recording(trainer_cls, rec: dict):
    """``trainer_cls`` whose ``training_step`` adds each micro-batch's real tokens, token slots and loss to
    ``rec``'s current step (the loss it returns is this rank's share of the global objective)."""

    class Recording(trainer_cls):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            rec["cur"]["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            rec["cur"]["slots"] += inputs["input_ids"].numel()
            loss = super().training_step(model, inputs, num_items_in_batch)
            rec["cur"]["loss"] += float(loss) / self.args.world_size
            return loss

    return Recording


def step_clock(rec: dict):
    """A ``TrainerCallback`` closing a step at every optimizer step end: barrier, then wall and CPU time."""
    import torch.distributed as dist
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            dist.barrier()
            rec["rss_after_init"] = rss_bytes()
            rec["t"], rec["c"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            c = time.process_time()
            dist.barrier()
            t = time.perf_counter()
            rec["steps"].append(dict(rec["cur"], step_s=t - rec["t"], cpu_s=c - rec["c"]))
            rec["cur"] = {"tokens": 0, "slots": 0, "loss": 0.0}
            rec["t"], rec["c"] = t, time.process_time()

    return StepClock()


def hf_worker(rank, world, system, cfg, samples, out_prefix):
    """Trains ``samples`` with the HF system; writes per-step records and memory to ``out_prefix.rank``."""
    import warnings

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from ds_chunkflow.deepspeed.deepspeed_adapter import decide_shm_comm_build
    from ds_chunkflow.testing.tokenizer import build_tokenizer

    warnings.filterwarnings("ignore", category=FutureWarning)
    decide_shm_comm_build()  # before DeepSpeed's init_distributed
    cpu_deepspeed_state()
    rec = {"steps": [], "cur": {"tokens": 0, "slots": 0, "loss": 0.0}}
    common = dict(output_dir=cfg["out_dir"], per_device_train_batch_size=cfg[system]["micro_batch"],
                  gradient_accumulation_steps=cfg[system]["grad_accum"], num_train_epochs=1, learning_rate=cfg["lr"],
                  weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
                  optim="adamw_torch", bf16=False, fp16=False, deepspeed=ds_config(cfg["zero_stage"]),
                  report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=cfg["seed"],
                  dataloader_pin_memory=False, train_sampling_strategy=cfg[system]["sampling"],
                  accelerator_config={"use_configured_state": True})  # the state of cpu_deepspeed_state
    tokenizer = build_tokenizer()
    if system == "trainer_padded":
        args = TrainingArguments(**common)
        model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
        trainer_cls, kwargs = recording(Trainer, rec), {"data_collator": collator}
    else:
        from trl import SFTConfig, SFTTrainer

        packed = system == "trl_bfd"
        extra = {"gradient_checkpointing": False} if cfg["trl_no_checkpointing"] else {}
        args = SFTConfig(**common, **extra, packing=packed, packing_strategy="bfd", padding_free=True,
                         max_length=cfg["max_len"] if packed else None)
        model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
        trainer_cls, kwargs = recording(SFTTrainer, rec), {}
    rec["rss_after_load"] = rss_bytes()
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(samples), processing_class=tokenizer,
                          callbacks=[step_clock(rec)], **kwargs)
    data = trainer.train_dataset
    rec["dataset_tokens"] = sum(len(x) for x in data["input_ids"])
    rec["dataset_samples"] = sum(len(s) for s in data["seq_lengths"]) if "seq_lengths" in data.column_names else len(data)
    rec["dataset_rows"] = len(data)
    rec["gradient_checkpointing"] = bool(trainer.args.gradient_checkpointing)
    trainer.train()
    rec["peak_rss"] = rss_bytes()
    del rec["cur"], rec["t"], rec["c"]
    Path(f"{out_prefix}.{rank}").write_text(json.dumps(rec))


# ----------------------------------------------------------------------------- driver
def run_alst(cfg, warmup, batches, world=2) -> list[dict]:
    from ds_chunkflow.testing.spawn import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "alst")
        run_ranks(alst_worker, cfg, warmup, batches, prefix, world=world, timeout=cfg["timeout"])
        return [json.loads(Path(f"{prefix}.{r}").read_text()) for r in range(world)]


def run_hf(system, cfg, samples, world=2) -> list[dict]:
    from ds_chunkflow.testing.spawn import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, system)
        run_ranks(hf_worker, system, dict(cfg, out_dir=tmp), samples, prefix, world=world, timeout=cfg["timeout"])
        return [json.loads(Path(f"{prefix}.{r}").read_text()) for r in range(world)]


def summarise_hf(system, ranks, input_tokens, input_samples, num_warmup_steps=1) -> dict:
    """The row of an HF system: its first optimizer step is the warm-up, the rest are timed."""
    steps = [[r["steps"][i] for r in ranks] for i in range(len(ranks[0]["steps"]))]
    timed = steps[num_warmup_steps:]
    if not timed:
        raise RuntimeError(f"{system}: only {len(steps)} optimizer step(s), nothing left to time after the warm-up")
    tokens = sum(x["tokens"] for s in timed for x in s)
    wall = sum(s[0]["step_s"] for s in timed)
    mib = 2**20
    return {
        "system": system, "tokens_per_s": tokens / wall,
        "tokens_per_cpu_s": tokens / sum(max(x["cpu_s"] for x in s) for s in timed),
        "s_per_step": wall / len(timed), "optimizer_steps": len(steps), "timed_steps": len(timed),
        "peak_rss_mib": max(r["peak_rss"] for r in ranks) / mib,
        "load_rss_mib": max(r["rss_after_load"] for r in ranks) / mib,
        "train_rss_mib": max(r["peak_rss"] - r["rss_after_init"] for r in ranks) / mib,
        "computed_per_real": sum(x["slots"] for s in steps for x in s) / sum(x["tokens"] for s in steps for x in s),
        "tokens_truncated": input_tokens - ranks[0]["dataset_tokens"],
        "samples_dropped": input_samples - ranks[0]["dataset_samples"],
        "tokens_trained_extra": sum(x["tokens"] for s in steps for x in s) - ranks[0]["dataset_tokens"],
        "dataset_rows": ranks[0]["dataset_rows"], "gradient_checkpointing": ranks[0]["gradient_checkpointing"],
        "losses": [sum(x["loss"] for x in s) for s in timed], "warmup_loss": sum(x["loss"] for x in steps[0]),
        "step_s": [s[0]["step_s"] for s in timed], "per_rank_peak_rss_mib": [r["peak_rss"] / mib for r in ranks],
    }


def bfd_rows(samples, max_len: int) -> int:
    """How many rows TRL's own BFD packing makes of ``samples`` (to size grad accumulation)."""
    from datasets import Dataset
    from trl import pack_dataset

    return len(pack_dataset(Dataset.from_list(samples), max_len, "bfd"))


def plan(args, samples) -> dict:
    """Per HF system: micro-batch, grad accumulation and sampler mapping its steps onto the global batches."""
    world, gb = 2, args.global_batch
    if gb % (world * args.trainer_micro_batch):
        raise ValueError(f"--global_batch {gb} must be a multiple of 2 x --trainer_micro_batch {args.trainer_micro_batch}")
    rows = bfd_rows(samples, max(len(s["input_ids"]) for s in samples))
    return {"trainer_padded": {"micro_batch": args.trainer_micro_batch, "sampling": "sequential",
                               "grad_accum": gb // (world * args.trainer_micro_batch)},
            "trl_padding_free": {"micro_batch": gb // world, "grad_accum": 1, "sampling": "sequential"},
            "trl_bfd": {"micro_batch": 1, "grad_accum": max(1, rows // (world * (args.steps + 1))), "sampling": "random",
                        "rows": rows}}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 steps of 16 samples <= 2048 tokens + a 4096-token sample, "
                   "chunk_size 256")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--global_batch", type=int, default=32)
    p.add_argument("--chunk_size", type=int, default=1024, help="bench_engine's default")
    p.add_argument("--trainer_micro_batch", type=int, default=1, help="trainer_padded: samples per device micro-batch")
    p.add_argument("--trl_no_checkpointing", action="store_true", help="TRL without its default gradient checkpointing")
    p.add_argument("--long_sample", type=int, default=0, help="as bench_engine: replace each timed batch's first "
                   "sample by a synthetic one of this many tokens")
    p.add_argument("--max_len", type=int, default=None, help="use only data samples up to this length")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1500, help="seconds per system")
    p.add_argument("--out", default=None, help="JSON name in benchmarks/results (default peers[_quick].json)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.global_batch, args.chunk_size = 2, 16, 256
        args.max_len = args.max_len or 2048
        args.long_sample = args.long_sample or 4096
    return args


def ratios(rows) -> list[dict]:
    """ChunkFlow / the peer with the most tokens per second (and / every peer)."""
    peers = [r for r in rows if r["system"] in PEERS]
    ours = [r for r in rows if r["system"] in CHUNKFLOW_VARIANTS]
    if not ours or not peers:
        return []
    best = max(peers, key=lambda r: r["tokens_per_s"])["system"]
    return [{"pair": f"{cf['system']} / {p['system']}" + (" (best peer)" if p["system"] == best else ""),
             "tokens_per_s": cf["tokens_per_s"] / p["tokens_per_s"],
             "tokens_per_cpu_s": cf["tokens_per_cpu_s"] / p["tokens_per_cpu_s"],
             "peak_rss": cf["peak_rss_mib"] / p["peak_rss_mib"]} for cf in ours for p in peers]


def main():
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import shutil

    from ds_chunkflow.testing.models import build_tiny_model
    from ds_chunkflow.testing.tokenizer import build_tokenizer

    warmup, batches = make_batches(load_samples(args.max_len), args.global_batch, args.steps, args.seed)
    warmup = (warmup * math.ceil(args.global_batch / len(warmup)))[:args.global_batch]  # a full global batch
    if args.long_sample:
        batches = [[long_sample(args.long_sample, seed=i)] + b[1:] for i, b in enumerate(batches)]
    samples = [s for b in [warmup] + batches for s in b]  # what every HF system gets, in this order
    model_dir = tempfile.mkdtemp(prefix="bench_peers_model_")
    spec = dict(MODEL, tie_word_embeddings=False)
    build_tiny_model(spec["family"], **{k: v for k, v in spec.items() if k != "family"}, seed=0, save_dir=model_dir)
    cfg = {"steps": args.steps, "global_batch": args.global_batch, "chunk_size": args.chunk_size, "keep_chunks": 1,
           "zero_stage": 2, "lr": 1e-3, "seed": args.seed, "pad_id": build_tokenizer().pad_token_id, "profile": False,
           "timeout": args.timeout, "model": spec, "model_dir": model_dir, "recompute_layers": "none",
           "long_sample": args.long_sample, "micro_batch": 1, "row_len": 0, "trl_no_checkpointing": args.trl_no_checkpointing,
           "max_len": max(len(s["input_ids"]) for s in samples), "world": 2, "precision": "fp32",
           "optimizer": "torch.optim.AdamW (Trainer: optim='adamw_torch')", **plan(args, samples)}
    stats = data_stats(batches)
    input_tokens = sum(len(s["input_ids"]) for s in samples)
    print(f"data: {stats['num_samples']} timed samples in {args.steps} steps (+1 warm-up of {len(warmup)}), "
          f"{stats['tokens']} tokens, longest {stats['max_len']}, median {stats['median_len']}")

    name = args.out or ("peers_quick.json" if args.quick else "peers.json")
    data = dict(stats, input_tokens_with_warmup=input_tokens)
    rows = []
    for system in args.systems.split(","):
        t = time.perf_counter()
        if system in CHUNKFLOW_VARIANTS:
            row = summarise(system, run_system(system, cfg, warmup, batches), batches, cfg)
            row.update(optimizer_steps=args.steps + 1, timed_steps=args.steps, tokens_truncated=0, samples_dropped=0,
                       tokens_trained_extra=0, gradient_checkpointing=False)
        elif system == "alst":
            row = summarise_alst(run_alst(cfg, warmup, batches), batches)
        else:
            row = summarise_hf(system, run_hf(system, cfg, samples), input_tokens, len(samples))
        base = "chunkflow" if system in CHUNKFLOW_VARIANTS else system
        row.update(attention=ATTENTION[base], loss_normalisation=LOSS[base], load_avg_1min=os.getloadavg()[0],
                   variant=CHUNKFLOW_VARIANTS.get(system, ""))
        rows.append(row)
        print(f"  {system}: {time.perf_counter() - t:.1f} s wall, load {row['load_avg_1min']:.1f}, steps "
              f"{[round(x, 2) for x in row['step_s']]} s, losses {[round(x, 5) for x in row['losses']]}", flush=True)
        save_json(name, {"config": cfg, "data": data, "rows": rows, "complete": False})  # kept if a later system fails
    cf = next((r for r in rows if r["system"] == "chunkflow"), None)
    for r in rows:  # same batches (sequential mapping) -> same losses; trl_bfd trains other batches
        same = cf is not None and r["system"] != "trl_bfd" and len(r["losses"]) == len(cf["losses"])
        r["max_loss_diff"] = max(abs(a - b) for a, b in zip(r["losses"], cf["losses"])) if same else "n/a"
    columns = ["system", "tokens_per_s", "tokens_per_cpu_s", "s_per_step", "optimizer_steps", "peak_rss_mib",
               "train_rss_mib", "computed_per_real", "tokens_truncated", "samples_dropped", "tokens_trained_extra",
               "gradient_checkpointing", "max_loss_diff"]
    print(table(rows, columns))
    pairs = ratios(rows)
    if pairs:
        print(table(pairs))
    shutil.rmtree(model_dir, ignore_errors=True)
    path = save_json(name, {"config": cfg, "data": data, "rows": rows, "ratios": pairs, "complete": True})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
