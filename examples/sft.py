"""Supervised fine-tuning of a Hugging Face causal LM with ChunkFlow under DeepSpeed.

    deepspeed --num_gpus 2 examples/sft.py --deepspeed_config ds_configs/sft_zero3.yaml

Without --model it builds a tiny random Qwen2 and a local tokenizer, saves them, and
loads them back with from_pretrained (the path a real checkpoint takes). On a GPU
cluster pass --model /path/to/checkpoint and a real dataset; nothing else changes.
"""

import argparse
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

import ds_chunkflow
from ds_chunkflow.checkpoint import checkpoint_entries
from ds_chunkflow.config import load_config_file, split_config
from ds_chunkflow.hf_data import load_sft_data


def set_monitor_paths(config: dict, output_dir: str, run_id: str) -> None:
    """Monitors write under ``output_dir`` (``<output_dir>/csv_monitor/<job_name>-<run_id>/``, the same for
    tensorboard), a new folder per run, so a resumed run never appends to the killed run's files. An
    ``output_path`` given in the config is kept; the run id is always added to the job name."""
    for key in ("csv_monitor", "tensorboard"):
        section = config.get(key)
        if isinstance(section, dict) and section.get("enabled"):
            section.setdefault("output_path", os.path.join(output_dir, key))
            section["job_name"] = f"{section.get('job_name', 'sft')}-{run_id}"


def model_vocab_size(model) -> int:
    """Ids the model can embed: rows of its input embedding (the full shape under ZeRO-3, where the weight
    is partitioned: ``ds_shape``, else ``config.vocab_size``)."""
    weight = model.get_input_embeddings().weight
    shape = getattr(weight, "ds_shape", None) or weight.shape
    return int(shape[0]) if len(shape) == 2 and shape[0] > 0 else int(model.config.vocab_size)

# ----------------------------------------------------------------------------- config
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--deepspeed_config", default="ds_configs/sft_zero3.yaml")
parser.add_argument("--model", default=None, help="HF model dir; default: a tiny random Qwen2")
parser.add_argument("--data", default="examples/data/sample_sft.jsonl", help=".jsonl, .json, .parquet or a "
                    "save_to_disk dir; chat lines use the tokenizer's own chat template (stock templates work)")
parser.add_argument("--on_error", choices=["error", "skip"], default="error",
                    help="a bad data line: stop naming file and line (default), or skip it and count it by reason")
parser.add_argument("--assistant_turns", choices=["all", "last"], default="all",
                    help="chat lines: loss on every assistant reply (default) or on the last one only")
parser.add_argument("--data_cache", default=None, help="tokenised-data cache (default: <output_dir>/data_cache)")
parser.add_argument("--num_proc", type=int, default=None, help="tokenising processes (default: the CPUs, at most 8)")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--output_dir", default="outputs/sft")
parser.add_argument("--overwrite", action="store_true",
                    help="train into an --output_dir that holds another run's checkpoints (its tags get overwritten)")
parser.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
parser.add_argument("--resume", nargs="?", const="required", choices=["auto", "required"], default=None,
                    help="continue from the latest complete checkpoint in output_dir (an error if there is none); "
                    "`--resume auto`: start fresh if there is none")
parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))  # set by the launcher
args = parser.parse_args()
config = load_config_file(args.deepspeed_config)  # read once, validated before any data is read
cf, _ = split_config(config)
existing = checkpoint_entries(args.output_dir)  # checked on every rank before anything is written
if existing and not (args.resume or args.overwrite):
    parser.error(f"--output_dir {args.output_dir} holds another run's checkpoints ({', '.join(existing)}); "
                 "pass --resume to continue that run, --overwrite to train over it, or choose another --output_dir")
set_monitor_paths(config, args.output_dir, run_id=time.strftime("%Y%m%d-%H%M%S"))
os.environ.setdefault("WANDB_MODE", "offline")  # no network by default; `wandb sync` later
os.environ.setdefault("WANDB_DIR", args.output_dir)
Path(args.output_dir).mkdir(parents=True, exist_ok=True)

# ----------------------------------------------------------------------------- model
if args.model is None:
    from ds_chunkflow.testing.models import build_tiny_model
    from ds_chunkflow.testing.tokenizer import VOCAB_SIZE, build_tokenizer

    args.model = os.path.join(args.output_dir, "tiny-qwen2")
    if int(os.environ.get("RANK", 0)) == 0 and not os.path.exists(os.path.join(args.model, "config.json")):
        build_tokenizer(save_dir=args.model)
        build_tiny_model("qwen2", save_dir=args.model, vocab_size=VOCAB_SIZE, hidden_size=128, num_layers=4)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # other ranks wait until rank 0 has written it
        ds_chunkflow.init_distributed()
        torch.distributed.barrier()
tokenizer = AutoTokenizer.from_pretrained(args.model)
# under ZeRO-3 each rank loads only its partition (transformers' zero.Init path), in the config's dtype
model = ds_chunkflow.load_pretrained(args.model, config)
vocab_size = model_vocab_size(model)  # may be < len(tokenizer): the loader refuses ids the model cannot embed
stages = (config.get("pipeline") or {}).get("stages", 1)
if stages > 1:  # pipeline parallelism: the model's layers become a DeepSpeed PipelineModule
    from ds_chunkflow.pipeline.model import pipeline_module

    ds_chunkflow.init_distributed()
    model = pipeline_module(model, num_stages=stages)

# ----------------------------------------------------------------------------- data
if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
    ds_chunkflow.init_distributed()  # so that one rank per node tokenises and the others memory-map its cache
dataset = load_sft_data(args.data, tokenizer, max_seq_len=cf.max_seq_len if cf else None,
                        on_overlong=cf.on_overlong if cf else "error", on_error=args.on_error, vocab_size=vocab_size,
                        assistant_turns=args.assistant_turns, num_proc=args.num_proc,
                        cache_dir=args.data_cache or os.path.join(args.output_dir, "data_cache"))
if int(os.environ.get("RANK", 0)) == 0:
    print(f"data: {dataset.stats.summary()}")

# ----------------------------------------------------------------------------- engine
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
engine, *_ = ds_chunkflow.initialize(model=model, optimizer=optimizer, training_data=dataset,
                                     config=config)
is_main = engine.global_rank == 0
if is_main:
    g = engine.guard_report  # the model guard's probe: chunked == unchunked forward, checked at start-up
    print(f"guard: {g.model_class} exact under chunking (probe error {g.max_error:.1e}) in {g.seconds:.2f} s")
    if getattr(engine, "chunkflow_autotune", None) is not None:  # chunk_size / keep_chunks: auto
        print(f"autotune: {engine.chunkflow_autotune.summary()}")
if args.resume:  # the same decision on every rank (rank 0 looks); none to resume from: an error unless auto
    from ds_chunkflow.checkpoint import CheckpointError, resume_decision

    try:
        found = resume_decision(args.output_dir, args.resume)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    if found is None:
        if is_main:
            print(f"--resume auto: no complete checkpoint in {args.output_dir}; starting fresh")
    else:
        engine.load_checkpoint(args.output_dir)
        loaded = engine.chunkflow_loaded_checkpoint
        if is_main:
            print(f"resumed from {args.output_dir}/{loaded.tag} at step {engine.global_steps}"
                  + (f" (fallback, skipped: {'; '.join(loaded.skipped)})" if loaded.skipped else ""))

# ----------------------------------------------------------------------------- loop
history = []
start = time.perf_counter()
bar = tqdm(range(engine.global_steps, args.steps), disable=not is_main, desc="sft", unit="step")
for step in bar:
    loss = engine.train_batch().item()
    m = engine.last_metrics
    history.append(m)
    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{m['tokens_per_sec']:.0f}", chunks=int(m["chunks_standalone"] +
                    m["chunks_dependent"]))
    if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
        engine.save_checkpoint(args.output_dir)
engine.save_checkpoint(args.output_dir)  # the final step, saved once

# ----------------------------------------------------------------------------- summary
if is_main and history:
    k = max(1, len(history) // 5)
    first = sum(h["loss"] for h in history[:k]) / k
    last = sum(h["loss"] for h in history[-k:]) / k
    tokens = sum(h["tokens"] for h in history)
    seconds = time.perf_counter() - start
    print(f"\nloss {first:.3f} -> {last:.3f} (mean of first/last {k} steps)")
    print(f"{tokens:.0f} tokens in {seconds:.1f} s: {tokens / seconds:.0f} tokens/s on {engine.dp_world_size} ranks")
    print(f"chunks per step: {sum(h['chunks_standalone'] for h in history) / len(history):.1f} standalone, "
          f"{sum(h['chunks_dependent'] for h in history) / len(history):.1f} dependent; packing efficiency "
          f"{sum(h['packing_efficiency'] for h in history) / len(history):.3f}; recompute fraction "
          f"{sum(h['recompute_fraction'] for h in history) / len(history):.3f}; dp imbalance "
          f"{max(h['dp_imbalance'] for h in history):.2f} (max)")
    if "peak_activation_bytes" in history[0]:
        print(f"peak activations {max(h['peak_activation_bytes'] for h in history) / 2**20:.1f} MiB, "
              f"peak K/V state {max(h['peak_kv_state_bytes'] for h in history) / 2**20:.1f} MiB")
    if "zero3_param_gathers" in history[0]:
        print(f"ZeRO-3 parameter all-gathers per step (rank 0): "
              f"{sum(h['zero3_param_gathers'] for h in history) / len(history):.0f}, "
              f"{sum(h['zero3_param_gather_bytes'] for h in history) / len(history) / 2**20:.1f} MiB")
    print(f"checkpoint: {args.output_dir}; wandb (offline) files: {os.environ['WANDB_DIR']}/wandb")
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
