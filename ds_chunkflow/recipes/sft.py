"""Supervised fine-tuning of a Hugging Face causal LM with ChunkFlow under DeepSpeed: the installed recipe.

    deepspeed --num_gpus 2 --module ds_chunkflow.sft --deepspeed_config ds_configs/sft_zero3.yaml \\
        --model DIR --data train.jsonl --eval_data val.jsonl --output_dir OUT
    python -m ds_chunkflow.sft ...                      # one process
    torchrun --nproc_per_node 2 -m ds_chunkflow.sft ...

Without --model it builds a tiny random Qwen2 and a local tokenizer, saves them, and loads them back
with from_pretrained (the path a real checkpoint takes). A run ends with a DeepSpeed checkpoint in OUT
(resumable) and a Hugging Face directory OUT/final (config, safetensors, generation config, tokenizer;
an adapter directory for LoRA unless --merge_lora). ``--help`` lists every option and its default.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ds_chunkflow.sft", description=__doc__.split("\n")[0],
                                formatter_class=HELP_FORMAT)
    p.add_argument("--deepspeed_config", default="ds_configs/sft_zero3.yaml", help="ds_config (YAML or JSON)")
    p.add_argument("--model", default=None, help="Hugging Face model dir (default: a tiny random Qwen2)")
    p.add_argument("--data", nargs="+", default=["examples/data/sample_sft.jsonl"], help=".jsonl, .json, "
                   ".parquet or save_to_disk dirs (several: a deterministic mix, each file with its own cache); "
                   "chat lines use the tokenizer's own chat template")
    p.add_argument("--data_weights", nargs="+", type=float, default=None,
                   help="sampling weight per --data file (default: every sample once per epoch)")
    p.add_argument("--on_error", choices=["error", "skip"], default="error",
                   help="a bad data line: stop naming file and line, or skip it and count it by reason")
    p.add_argument("--assistant_turns", choices=["all", "last"], default="all",
                   help="chat lines: loss on every assistant reply or on the last one only")
    p.add_argument("--non_prefix_stable", choices=["expand", "error"], default="expand",
                   help="chat lines a template does not render prefix-stably (Qwen3 reasoning): one sample per "
                   "assistant turn, or a data error (docs/data.md)")
    p.add_argument("--data_cache", default=None, help="tokenised-data cache (default: <output_dir>/data_cache)")
    p.add_argument("--num_proc", type=int, default=None, help="tokenising processes (default: the CPUs, at most 8)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (global batches); default 30, or "
                   "what --epochs takes")
    p.add_argument("--epochs", type=int, default=None, help="train this many epochs of the data (instead of --steps)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (a `scheduler` section shapes it)")
    p.add_argument("--output_dir", default="outputs/sft")
    p.add_argument("--overwrite", action="store_true",
                   help="train into an --output_dir that holds another run's checkpoints, and replace an export "
                   "directory that is not ours")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep_checkpoints", type=int, default=0,
                   help="keep the newest N complete checkpoints, delete older ones after each save (0: keep all)")
    p.add_argument("--resume", nargs="?", const="required", choices=["auto", "required"], default=None,
                   help="continue from the latest complete checkpoint in output_dir (an error if there is none); "
                   "`--resume auto`: start fresh if there is none")
    e = p.add_argument_group("evaluation (the chunked forward without backward)")
    e.add_argument("--eval_data", default=None, help="evaluation file (same formats and checks as --data)")
    e.add_argument("--eval_split", type=float, default=None,
                   help="hold out this fraction of --data (seeded by chunkflow.data.seed; never trained on)")
    e.add_argument("--eval_every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    x = p.add_argument_group("export (a Hugging Face directory)")
    x.add_argument("--export_every", type=int, default=0, help="also write OUT/export-<step> every N steps")
    x.add_argument("--export_dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: the training dtype; float32: the fp32 master weights")
    x.add_argument("--max_shard_size", default="5GB", help="largest safetensors file")
    x.add_argument("--no_export", action="store_true", help="end with the DeepSpeed checkpoint only")
    lo = p.add_argument_group("LoRA (peft)")
    lo.add_argument("--lora_r", type=int, default=0, help="adapter rank; 0: full fine-tuning")
    lo.add_argument("--lora_alpha", type=float, default=16.0)
    lo.add_argument("--lora_dropout", type=float, default=0.0)
    lo.add_argument("--lora_target_modules", nargs="+", default=None,
                    help="module names (default: every linear layer of the decoder blocks)")
    lo.add_argument("--merge_lora", action="store_true",
                    help="export the full model with the adapters merged (default: the adapter directory)")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    return p


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
    from ds_chunkflow.deepspeed.deepspeed_adapter import full_shape

    shape = full_shape(weight)
    return int(shape[0]) if len(shape) == 2 and shape[0] > 0 else int(model.config.vocab_size)


def fill_total_steps(config: dict, steps: int) -> dict:
    """``scheduler.params.total_num_steps: auto`` -> the run's last step (``--steps``), so a warm-up +
    decay schedule ends where the run does; any other value is kept (and checked by the config)."""
    params = (config.get("scheduler") or {}).get("params")
    if isinstance(params, dict) and params.get("total_num_steps") == "auto":
        params["total_num_steps"] = steps
    return config


def run_length(args, dataset, cf) -> int:
    """Optimizer steps: --steps, or the global batches of --epochs epochs (the engine's sampler, counted)."""
    if args.epochs is None:
        return 30 if args.steps is None else args.steps
    from ds_chunkflow.data.mix import steps_for_epochs

    if cf is None:
        raise SystemExit("error: --epochs needs a chunkflow section (its data settings define a global batch)")
    d = cf.data
    return steps_for_epochs(dataset, args.epochs, batch_size=d.global_batch_size, token_budget=d.global_batch_tokens,
                            seed=d.seed, shuffle=d.shuffle)


def save(engine, args) -> None:
    """A checkpoint, then --keep_checkpoints' retention (rank 0 deletes, crash-safely, only older complete tags)."""
    engine.save_checkpoint(args.output_dir)
    if args.keep_checkpoints:
        from ds_chunkflow.deepspeed.retention import prune_checkpoints

        prune_checkpoints(args.output_dir, keep=args.keep_checkpoints)


def single_process_env() -> None:
    """``python -m ds_chunkflow.sft`` without a launcher: one rank on a free local port (DeepSpeed would
    otherwise look for MPI)."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    from ds_chunkflow.testing.spawn import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def load_model(args, config: dict):
    """The tokenizer and the model (partitioned at load under ZeRO-3), LoRA adapters added if asked."""
    from transformers import AutoTokenizer

    import ds_chunkflow

    if args.model is None:
        from ds_chunkflow.testing.models import build_tiny_model
        from ds_chunkflow.testing.tokenizer import VOCAB_SIZE, build_tokenizer

        args.model = os.path.join(args.output_dir, "tiny-qwen2")
        if _rank() == 0 and not os.path.exists(os.path.join(args.model, "config.json")):
            build_tokenizer(save_dir=args.model)
            build_tiny_model("qwen2", save_dir=args.model, vocab_size=VOCAB_SIZE, hidden_size=128, num_layers=4)
        if _world() > 1:  # other ranks wait until rank 0 has written it
            ds_chunkflow.init_distributed()
            torch.distributed.barrier()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = ds_chunkflow.load_pretrained(args.model, config)
    if args.lora_r:
        from ds_chunkflow.hf.lora import apply_lora

        model = apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                           target_modules=args.lora_target_modules)
    return tokenizer, model


def load_data(args, paths: list[str], tokenizer, cf, vocab_size: int, weights: list[float] | None = None):
    """One file: its dataset; several: a :class:`~ds_chunkflow.data.mix.MixedDataset` (each file loaded and
    checked on its own, errors naming that file and line)."""
    from ds_chunkflow.data.hf_data import load_sft_data
    from ds_chunkflow.data.mix import load_sft_mix

    options = dict(max_seq_len=cf.max_seq_len if cf else None, on_overlong=cf.on_overlong if cf else "error",
                   on_error=args.on_error, vocab_size=vocab_size, assistant_turns=args.assistant_turns,
                   non_prefix_stable=args.non_prefix_stable,
                   num_proc=args.num_proc, cache_dir=args.data_cache or os.path.join(args.output_dir, "data_cache"))
    if len(paths) == 1 and weights is None:
        return load_sft_data(paths[0], tokenizer, **options)
    return load_sft_mix(paths, tokenizer, weights=weights, **options)


def evaluation_data(args, train, tokenizer, cf, vocab_size: int):
    """``(train, eval)``: --eval_data loaded like --data, or --eval_split held out of it, or no eval set."""
    from ds_chunkflow.recipes.holdout import holdout_split

    if args.eval_data and args.eval_split:
        raise SystemExit("error: --eval_data and --eval_split: give one of them")
    if args.eval_split:
        if len(args.data) > 1:
            raise SystemExit("error: --eval_split holds out part of one --data file; with several, pass --eval_data")
        train, held = holdout_split(train, args.eval_split, seed=cf.data.seed)
        return train, held, f"--eval_split {args.eval_split} of {args.data[0]}"
    if not args.eval_data:
        return train, None, None
    return train, load_data(args, [args.eval_data], tokenizer, cf, vocab_size), args.eval_data


def run_eval(engine, data, source: str, is_main: bool) -> float:
    from tqdm import tqdm

    loss = engine.evaluate(data)
    if is_main:  # through tqdm: a line of its own under the progress bar
        tqdm.write(f"eval step {engine.global_steps}: loss {loss:.4f} over {int(engine.last_eval['tokens']):,} tokens "
              f"({len(data)} samples of {source}, {engine.last_eval['seconds']:.1f} s)")
    return loss


def export(engine, path: str, args, tokenizer, is_main: bool) -> None:
    """OUT/final or OUT/export-<step>: the model (or its LoRA adapter) as a Hugging Face directory."""
    from ds_chunkflow.hf.export import save_pretrained
    from ds_chunkflow.runtime.memory import peak_rss_bytes

    start = time.perf_counter()
    save_pretrained(engine, path, tokenizer=tokenizer, dtype=args.export_dtype, max_shard_size=args.max_shard_size,
                    overwrite=args.overwrite, merge_lora=args.merge_lora)
    peak = peak_rss_bytes()
    if is_main:
        print(f"export: {path} in {time.perf_counter() - start:.1f} s (peak RSS of rank 0 {peak / 2**20:.0f} MiB)",
              flush=True)


def summarize(history: list[dict], engine, seconds: float) -> None:
    k = max(1, len(history) // 5)
    first = sum(h["loss"] for h in history[:k]) / k
    last = sum(h["loss"] for h in history[-k:]) / k
    tokens = sum(h["tokens"] for h in history)
    mean = lambda key: sum(h[key] for h in history) / len(history)  # noqa: E731
    print(f"\nloss {first:.3f} -> {last:.3f} (mean of first/last {k} steps)")
    print(f"{tokens:.0f} tokens in {seconds:.1f} s: {tokens / seconds:.0f} tokens/s on {engine.dp_world_size} ranks")
    print(f"chunks per step: {mean('chunks_standalone'):.1f} standalone, {mean('chunks_dependent'):.1f} dependent; "
          f"packing efficiency {mean('packing_efficiency'):.3f}; recompute fraction {mean('recompute_fraction'):.3f}; "
          f"dp imbalance {max(h['dp_imbalance'] for h in history):.2f} (max)")
    if "peak_activation_bytes" in history[0]:
        print(f"peak activations {max(h['peak_activation_bytes'] for h in history) / 2**20:.1f} MiB, "
              f"peak K/V state {max(h['peak_kv_state_bytes'] for h in history) / 2**20:.1f} MiB")
    drawn = {k.removeprefix("data_drawn_"): int(v) for k, v in history[-1].items() if k.startswith("data_drawn_")}
    if drawn:
        print("samples drawn per source: " + ", ".join(f"{k} {v}" for k, v in drawn.items()))
    if "zero3_param_gathers" in history[0]:
        print(f"ZeRO-3 parameter all-gathers per step (rank 0): {mean('zero3_param_gathers'):.0f}, "
              f"{mean('zero3_param_gather_bytes') / 2**20:.1f} MiB")


def main(argv: list[str] | None = None) -> None:
    import ds_chunkflow
    from ds_chunkflow.config import load_config_file, split_config
    from ds_chunkflow.deepspeed.checkpoint import checkpoint_entries

    # ------------------------------------------------------------------------- config
    parser = build_parser()
    args = parser.parse_args(argv)
    single_process_env()
    if args.steps is not None and args.epochs is not None:
        parser.error("--steps and --epochs: give one of them")
    if args.data_weights is not None and len(args.data_weights) != len(args.data):
        parser.error(f"--data_weights: {len(args.data_weights)} weights for {len(args.data)} --data files")
    config = load_config_file(args.deepspeed_config)  # read once, validated before any data is read; the
    provisional = fill_total_steps(copy.deepcopy(config), args.steps or 1 << 30)  # run's length is known below
    cf, _ = split_config(provisional)
    existing = checkpoint_entries(args.output_dir)  # checked on every rank before anything is written
    if existing and not (args.resume or args.overwrite):
        parser.error(f"--output_dir {args.output_dir} holds another run's checkpoints ({', '.join(existing)}); "
                     "pass --resume to continue that run, --overwrite to train over it, or choose another --output_dir")
    pipeline = (config.get("pipeline") or {}).get("stages", 1) > 1
    if pipeline and (args.eval_data or args.eval_split or args.lora_r or not args.no_export):
        parser.error("pipeline parallelism (a `pipeline` section): evaluation, LoRA and the Hugging Face export are "
                     "not supported yet; pass --no_export and leave --eval_data / --eval_split / --lora_r unset")
    set_monitor_paths(config, args.output_dir, run_id=time.strftime("%Y%m%d-%H%M%S"))
    os.environ.setdefault("WANDB_MODE", "offline")  # no network by default; `wandb sync` later
    os.environ.setdefault("WANDB_DIR", args.output_dir)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------- model
    tokenizer, model = load_model(args, provisional)
    vocab_size = model_vocab_size(model)  # may be < len(tokenizer): the loader refuses ids the model cannot embed
    if pipeline:  # the model's layers become a DeepSpeed PipelineModule
        from ds_chunkflow.pipeline.model import pipeline_module

        ds_chunkflow.init_distributed()
        model = pipeline_module(model, num_stages=config["pipeline"]["stages"])

    # ------------------------------------------------------------------------- data
    if _world() > 1 and not torch.distributed.is_initialized():
        ds_chunkflow.init_distributed()  # so that one rank per node tokenises and the others memory-map its cache
    dataset = load_data(args, args.data, tokenizer, cf, vocab_size, args.data_weights)
    dataset, eval_set, eval_source = evaluation_data(args, dataset, tokenizer, cf, vocab_size)
    args.steps = run_length(args, dataset, cf)
    fill_total_steps(config, args.steps)
    if eval_set is not None and eval_set.num_loss_tokens() == 0:
        raise SystemExit(f"error: {eval_source}: the evaluation set has no label tokens (every label is -100)")
    if _rank() == 0:
        print(f"data: {dataset.stats.summary()}" + (f"; eval: {len(eval_set)} samples of {eval_source}"
                                                      if eval_set is not None else ""))

    # ------------------------------------------------------------------------- engine
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    engine, *_ = ds_chunkflow.initialize(model=model, optimizer=optimizer, training_data=dataset, config=config)
    engine.chunkflow_tokenizer = tokenizer  # saved with each checkpoint: python -m ds_chunkflow.hf.export converts it
    is_main = engine.global_rank == 0
    if is_main:
        g = engine.guard_report  # the model guard's probe: chunked == unchunked forward, checked at start-up
        print(f"guard: {g.model_class} exact under chunking (probe error {g.max_error:.1e}) in {g.seconds:.2f} s")
        if getattr(engine, "chunkflow_autotune", None) is not None:  # chunk_size / keep_chunks: auto
            print(f"autotune: {engine.chunkflow_autotune.summary()}")
    if args.resume:  # the same decision on every rank (rank 0 looks); none to resume from: an error unless auto
        from ds_chunkflow.deepspeed.checkpoint import CheckpointError, resume_decision

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

    # ------------------------------------------------------------------------- loop
    from tqdm import tqdm

    history = []
    start = time.perf_counter()
    bar = tqdm(range(engine.global_steps, args.steps), disable=not is_main, desc="sft", unit="step")
    for step in bar:
        loss = engine.train_batch().item()
        m = engine.last_metrics
        history.append(m)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{m.get('lr', args.lr):.2e}", tok_s=f"{m['tokens_per_sec']:.0f}")
        done = step + 1
        if eval_set is not None and args.eval_every and done % args.eval_every == 0 and done < args.steps:
            run_eval(engine, eval_set, eval_source, is_main)
        if args.save_every and done % args.save_every == 0 and done < args.steps:
            save(engine, args)
        if args.export_every and done % args.export_every == 0 and done < args.steps:
            export(engine, os.path.join(args.output_dir, f"export-{done}"), args, tokenizer, is_main)
    seconds = time.perf_counter() - start
    save(engine, args)  # the final step, saved once
    if eval_set is not None:
        run_eval(engine, eval_set, eval_source, is_main)
    if not args.no_export:
        export(engine, os.path.join(args.output_dir, "final"), args, tokenizer, is_main)

    # ------------------------------------------------------------------------- summary
    if is_main and history:
        summarize(history, engine, seconds)
        print(f"checkpoint: {args.output_dir}; wandb (offline) files: {os.environ['WANDB_DIR']}/wandb")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
