"""Memory of the loss at a real vocabulary, and of activation checkpointing inside a chunk (single process, CPU).

    OMP_NUM_THREADS=1 python benchmarks/bench_loss_memory.py           # ~3 min on one idle core
    OMP_NUM_THREADS=1 python benchmarks/bench_loss_memory.py --quick

Part ``loss``: one 4096-token chunk (every token a target) of a Qwen2 with Qwen2.5's vocabulary
(151,936) and a tiny hidden size (64, 2 layers), one forward + backward:
* ``full_logits``  the chunk's ``[4096, 151936]`` logits and cross-entropy, as a plain training step
                   (and ChunkFlow before its chunked loss) computes them;
* ``chunked_loss`` ``ds_chunkflow.chunked_step``: the loss projects target rows ``--piece`` at a time
                   under checkpoint (``chunkflow.loss_piece_tokens``).

Part ``recompute``: one sequence of 8 chunks of 1024 tokens (hidden 256, 4 layers), K=1, with
``chunkflow.recompute_layers`` none / every 2nd layer / all.

Columns: ``peak_activation_mib`` bytes autograd holds for backward (saved-tensor hooks, per unique
storage, parameters excluded); ``peak_rss_mib`` the process's peak RSS (each point runs in a fresh
process); ``step_s`` median of ``--repeats`` steps. Writes benchmarks/results/loss_memory.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import in_fresh_process, rss_bytes, save_json, table  # noqa: E402
from bench_memory import _full_step  # noqa: E402  (the whole sequence's logits and CE in one call)

VOCAB = 151_936


def _sequence(n: int, vocab: int):
    import torch

    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n))
    return [{"input_ids": ids, "labels": ids.clone()}]


def _point(part: str, system: str, args: dict, queue) -> None:
    import torch

    from ds_chunkflow import chunked_step
    from ds_chunkflow.hf.model import enable_recompute
    from ds_chunkflow.runtime.memory import ActivationMeter
    from ds_chunkflow.testing.models import build_tiny_model

    torch.set_num_threads(1)
    if part == "loss":
        model = build_tiny_model("qwen2", vocab_size=VOCAB, hidden_size=64, num_layers=2)
        seqs, chunk = _sequence(args["chunk"], VOCAB), args["chunk"]
    else:
        model = build_tiny_model("qwen2", vocab_size=512, hidden_size=256, num_layers=4)
        seqs, chunk = _sequence(8 * args["rchunk"], 512), args["rchunk"]
        enable_recompute(model, {"none": "none", "every_2": 2, "all": "all"}[system])
    model.train()
    times, peak = [], 0
    for _ in range(args["repeats"]):
        meter = ActivationMeter()
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        if system == "full_logits":
            _full_step(model, seqs, meter)
        else:
            chunked_step(model, seqs, chunk_size=chunk, keep_chunks=1, meter=meter, loss_piece_tokens=args["piece"])
        times.append(time.perf_counter() - start)
        peak = max(peak, meter.peak)
    tokens = seqs[0]["input_ids"].numel()
    queue.put({"part": part, "system": system, "tokens": tokens, "peak_activation_mib": peak / 2**20,
               "peak_rss_mib": rss_bytes() / 2**20, "step_s": statistics.median(times),
               "tokens_per_s": tokens / statistics.median(times)})


def run_point(*args):
    return in_fresh_process(_point, *args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="chunk 1024 in the loss part, 256 in the recompute part")
    p.add_argument("--piece", type=int, default=1024, help="chunkflow.loss_piece_tokens")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = {"chunk": 1024 if a.quick else 4096, "rchunk": 256 if a.quick else 1024, "piece": a.piece,
            "repeats": 1 if a.quick else a.repeats}
    rows = [run_point("loss", s, args) for s in ("full_logits", "chunked_loss")]
    rows += [run_point("recompute", s, args) for s in ("none", "every_2", "all")]
    by = {(r["part"], r["system"]): r for r in rows}
    ratios = [{"pair": "chunked_loss / full_logits",
               "peak_activation": by["loss", "chunked_loss"]["peak_activation_mib"] /
               by["loss", "full_logits"]["peak_activation_mib"],
               "peak_rss": by["loss", "chunked_loss"]["peak_rss_mib"] / by["loss", "full_logits"]["peak_rss_mib"],
               "tokens_per_s": by["loss", "chunked_loss"]["tokens_per_s"] / by["loss", "full_logits"]["tokens_per_s"]}]
    ratios += [{"pair": f"recompute {s} / none",
                "peak_activation": by["recompute", s]["peak_activation_mib"] /
                by["recompute", "none"]["peak_activation_mib"],
                "peak_rss": by["recompute", s]["peak_rss_mib"] / by["recompute", "none"]["peak_rss_mib"],
                "tokens_per_s": by["recompute", s]["tokens_per_s"] / by["recompute", "none"]["tokens_per_s"]}
               for s in ("every_2", "all")]
    print(table(rows))
    print(table(ratios))
    name = "loss_memory_quick.json" if a.quick else "loss_memory.json"
    path = save_json(name, {"config": {**args, "vocab": VOCAB, "loss_model": "qwen2 hidden 64, 2 layers",
                                       "recompute_model": "qwen2 hidden 256, 4 layers, vocab 512, K=1"},
                            "rows": rows, "ratios": ratios})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
