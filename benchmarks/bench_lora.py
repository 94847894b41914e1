"""Full fine-tuning vs LoRA through ChunkFlow: peak memory per rank and speed, same model and data.

    python benchmarks/bench_lora.py             # ~3 min on 2 CPU cores; benchmarks/results/lora.json

A Qwen2 of hidden 512, 8 layers, vocab 32000 (untied, ~54M parameters) on 2 ranks, ZeRO-2 and ZeRO-3,
AdamW, chunk_size 512, K = 1; the same global batches of sample chats (16 per step, <= 4096 tokens) for
every system. LoRA: r = 16 on every linear layer of the decoder blocks (``ds_chunkflow.hf.lora.apply_lora``).
Each run is a fresh pair of processes: the peak RSS (ru_maxrss) is the run's own, from start to the end of
the last step, per rank. Ratios are LoRA / full in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import load_samples, rss_bytes, save_json, save_random_qwen2, table  # noqa: E402

MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=8, num_attention_heads=8,
             num_key_value_heads=4, tie_word_embeddings=False)


def worker(rank, world, model_dir, stage, lora_r, batches, result_path):
    import ds_chunkflow
    from ds_chunkflow.hf.lora import apply_lora, trainable_parameters

    config = {"zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 1.0, "chunkflow": {"chunk_size": 512, "keep_chunks": 1}}
    model = ds_chunkflow.load_pretrained(model_dir, config)
    if lora_r:
        model = apply_lora(model, r=lora_r, alpha=2 * lora_r)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    engine, *_ = ds_chunkflow.initialize(model=model, optimizer=opt, config=config)
    seqs = [[{k: torch.tensor(v) for k, v in s.items()} for s in batch] for batch in batches]
    engine.train_batch(seqs[0])  # warm-up step, not timed
    start, tokens, losses = time.perf_counter(), 0, []
    for batch in seqs[1:]:
        losses.append(engine.train_batch(batch).item())
        tokens += engine.last_metrics["tokens"]
    seconds = time.perf_counter() - start
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainable_parameters(model))  # ZeRO-3: full size
    torch.save({"rank": rank, "peak_rss": rss_bytes(), "seconds": seconds, "tokens": tokens, "losses": losses,
                "trainable": trainable}, f"{result_path}.{rank}")


def main() -> None:
    from ds_chunkflow.testing.spawn import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--stages", default="2,3")
    args = parser.parse_args()
    samples = load_samples(4096)
    batches = [samples[i * 16:(i + 1) * 16] for i in range(args.steps + 1)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        num_params = save_random_qwen2(model_dir, MODEL)
        for stage in [int(s) for s in args.stages.split(",")]:
            runs = {}
            for name, r in (("full", 0), ("lora", args.lora_r)):
                out = os.path.join(tmp, f"{name}_{stage}")
                run_ranks(worker, model_dir, stage, r, batches, out, timeout=1800)
                runs[name] = [torch.load(f"{out}.{rank}") for rank in range(2)]
            for name, ranks in runs.items():
                for res in ranks:
                    full = runs["full"][res["rank"]]
                    rows.append({"zero": stage, "system": name, "rank": res["rank"],
                                 "trainable_M": res["trainable"] / 1e6, "peak_rss_MiB": res["peak_rss"] / 2**20,
                                 "rss_vs_full": res["peak_rss"] / full["peak_rss"],
                                 "tokens_per_s": res["tokens"] / res["seconds"],
                                 "speed_vs_full": (res["tokens"] / res["seconds"]) / (full["tokens"] / full["seconds"]),
                                 "first_loss": res["losses"][0]})
    print(f"model: {num_params / 1e6:.1f}M parameters, 2 ranks, {args.steps} timed steps of 16 sample chats; "
          f"LoRA r={args.lora_r}")
    print(table(rows))
    path = save_json("lora.json", {"num_parameters": num_params, "lora_r": args.lora_r, "steps": args.steps,
                                   "rows": rows})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
