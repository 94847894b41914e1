"""Export and evaluation of a ZeRO-3 model of ~110M parameters on 2 CPU ranks.

    python benchmarks/bench_export.py            # ~2 min; benchmarks/results/export.json

A Qwen2 of hidden 768, 12 layers, vocab 32000 (untied) is saved with ``save_pretrained`` and loaded
partitioned on 2 ranks (``ds_chunkflow.load_pretrained``, ZeRO-3, nothing persistent), trained one
step, evaluated with ``engine.evaluate`` (samples of the sample chats, longer ones split into
dependent chunks of 256 tokens) and exported with ``ds_chunkflow.save_pretrained`` in 100 MB shards.

Reported per rank: the export's wall time, the process's peak RSS (ru_maxrss) before and after it, and
the largest current RSS while exporting (sampled every 5 ms) above the RSS when it started: what the
export itself holds (one module gathered plus one pending shard), against the whole model in fp32. The eval loss is compared
with a plain unchunked forward of the exported model on the same samples in one process.
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

CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_attention_heads=12,
              num_key_value_heads=4, tie_word_embeddings=False)


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """The largest current RSS seen every 5 ms while the block runs (ru_maxrss only ever grows)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = current_rss(), threading.Event()
        self.start = self.peak

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, current_rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def worker(rank, world, model_dir, out_dir, samples, result_path):
    import ds_chunkflow

    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0,
              "chunkflow": {"chunk_size": 256, "keep_chunks": 1}}
    model = ds_chunkflow.load_pretrained(model_dir, config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = ds_chunkflow.initialize(model=model, optimizer=opt, config=config)
    seqs = [{k: torch.tensor(v) for k, v in s.items()} for s in samples]
    engine.train_batch(seqs[:8])
    start = time.perf_counter()
    eval_loss = engine.evaluate(seqs)
    eval_seconds = time.perf_counter() - start
    rss_before = rss_bytes()
    start = time.perf_counter()
    with RssSampler() as rss:
        ds_chunkflow.save_pretrained(engine, os.path.join(out_dir, "final"), max_shard_size="100MB")
    seconds = time.perf_counter() - start
    torch.save({"rank": rank, "export_seconds": seconds, "peak_rss_before_export": rss_before,
                "rss_at_export_start": rss.start, "rss_peak_during_export": rss.peak,
                "peak_rss_after_export": rss_bytes(), "eval_loss": eval_loss, "eval_seconds": eval_seconds,
                "eval_tokens": engine.last_eval["tokens"]}, f"{result_path}.{rank}")


def plain_eval(model_dir: str, samples: list[dict]) -> tuple[float, int]:
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            logits = model(input_ids=torch.tensor(s["input_ids"])[None]).logits[0].float()
            targets = torch.tensor(s["labels"][1:] + [-100])
            total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    return total / count, count


def main() -> None:
    from ds_chunkflow.testing.spawn import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_eval", type=int, default=24, help="evaluation samples (sample chats, <= 2048 tokens)")
    args = parser.parse_args()
    samples = [s for s in load_samples(2048)][: args.num_eval]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        num_params = save_random_qwen2(model_dir, CONFIG)
        run_ranks(worker, model_dir, tmp, samples, os.path.join(tmp, "result"), timeout=1200)
        ranks = [torch.load(os.path.join(tmp, f"result.{r}")) for r in range(2)]
        ref_loss, ref_tokens = plain_eval(os.path.join(tmp, "final"), samples)
        shards = sorted(f for f in os.listdir(os.path.join(tmp, "final")) if f.endswith(".safetensors"))
    rows = [{"rank": r["rank"], "export_s": r["export_seconds"],
             "peak_rss_before_MiB": r["peak_rss_before_export"] / 2**20,
             "peak_rss_after_MiB": r["peak_rss_after_export"] / 2**20,
             "rss_at_start_MiB": r["rss_at_export_start"] / 2**20,
             "export_rss_growth_MiB": (r["rss_peak_during_export"] - r["rss_at_export_start"]) / 2**20} for r in ranks]
    print(f"model: {num_params / 1e6:.1f}M parameters ({num_params * 4 / 2**20:.0f} MiB in fp32), ZeRO-3 on 2 ranks; "
          f"export in {len(shards)} shards of <= 100 MB")
    print(table(rows))
    rel = abs(ranks[0]["eval_loss"] - ref_loss) / ref_loss
    print(f"eval loss {ranks[0]['eval_loss']:.6f} (chunked, 2 ranks, {ranks[0]['eval_seconds']:.1f} s) vs "
          f"{ref_loss:.6f} (plain forward of the export, 1 process): relative difference {rel:.1e} over "
          f"{ref_tokens} tokens")
    path = save_json("export.json", {"num_parameters": num_params, "fp32_model_MiB": num_params * 4 / 2**20,
                                     "num_shards": len(shards), "ranks": rows, "eval_loss_chunked": ranks[0]["eval_loss"],
                                     "eval_loss_plain": ref_loss, "eval_relative_difference": rel,
                                     "eval_tokens": ref_tokens, "eval_seconds": ranks[0]["eval_seconds"]})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
