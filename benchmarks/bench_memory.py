"""Activation memory and speed of one training step vs. sequence length (single process, CPU).

    python benchmarks/bench_memory.py            # full: lengths 2x..64x chunk_size
    python benchmarks/bench_memory.py --quick

For one sequence of L = m x chunk_size tokens, one forward+backward of a tiny Qwen2:
* full       : the whole sequence in one call, no checkpointing;
* full+ckpt  : the same with transformers' (non-reentrant) activation checkpointing;
* chunkflow  : ``chunked_step`` at K=1, K=2 and K=N (every chunk kept).

Activation bytes are those autograd holds (saved-tensor hooks, per unique storage,
parameters excluded, peak over the step); the K/V state (and its gradient buffer) is
reported on its own. Each point runs in a fresh process so peak RSS is its own.
Writes benchmarks/results/memory.json and memory.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import RESULTS, in_fresh_process, save_json, table  # noqa: E402


def _model(hidden: int, layers: int):
    from ds_chunkflow.testing.models import build_tiny_model

    return build_tiny_model("qwen2", vocab_size=512, hidden_size=hidden, num_layers=layers)


def _sequence(n: int):
    import torch

    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 512, (n,), generator=g)
    return [{"input_ids": ids, "labels": ids.clone()}]


def _full_step(model, seqs, meter):
    import torch.nn.functional as F

    from ds_chunkflow.batch import shifted_targets
    from ds_chunkflow.memory import saved_tensor_hooks

    s = seqs[0]
    with saved_tensor_hooks(meter):
        logits = model(input_ids=s["input_ids"][None], use_cache=False).logits[0]
        loss = F.cross_entropy(logits.float(), shifted_targets(s["labels"]), reduction="mean")
    loss.backward()


def _point(system: str, multiple: int, chunk: int, hidden: int, layers: int, repeats: int, queue) -> None:
    import torch

    from ds_chunkflow import chunked_step
    from ds_chunkflow.batch_plan import plan_batch
    from ds_chunkflow.memory import ActivationMeter, peak_rss_bytes

    torch.set_num_threads(1)
    model = _model(hidden, layers)
    seqs = _sequence(multiple * chunk)
    keep = {"chunkflow K=1": 1, "chunkflow K=2": 2, "chunkflow K=N": multiple}.get(system)
    if system == "full+ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    times, meter, state = [], None, 0
    for _ in range(repeats + 1):  # the first is warm-up
        model.zero_grad(set_to_none=True)
        meter = ActivationMeter()
        start = time.perf_counter()
        if keep is None:
            _full_step(model, seqs, meter)
        else:
            state = chunked_step(model, seqs, chunk_size=chunk, keep_chunks=keep, meter=meter).peak_state_bytes
        times.append(time.perf_counter() - start)
    recompute = plan_batch(seqs, chunk_size=chunk, keep_chunks=keep).recompute_fraction() if keep else 0.0
    queue.put(dict(system=system, multiple=multiple, tokens=multiple * chunk, activation_MiB=meter.peak / 2**20,
                   kv_state_MiB=state / 2**20, peak_rss_MiB=peak_rss_bytes() / 2**20,
                   step_s=min(times[1:]), tokens_per_s=multiple * chunk / min(times[1:]),
                   recompute_fraction=recompute))


def run_point(*args):
    return in_fresh_process(_point, *args)


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for system in dict.fromkeys(r["system"] for r in rows):
        pts = [r for r in rows if r["system"] == system]
        axes[0].plot([r["multiple"] for r in pts], [r["activation_MiB"] for r in pts], marker="o", label=system)
        axes[1].plot([r["multiple"] for r in pts], [r["tokens_per_s"] for r in pts], marker="o", label=system)
    for ax, title in zip(axes, ["peak activation memory (MiB)", "tokens / s"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length / chunk_size")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--chunk_size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    multiples = [2, 4, 16] if args.quick else [2, 4, 8, 16, 32, 64]
    repeats = 1 if args.quick else 2
    systems = ["full", "full+ckpt", "chunkflow K=1", "chunkflow K=2", "chunkflow K=N"]
    rows = []
    for m in multiples:
        for system in systems:
            rows.append(run_point(system, m, args.chunk_size, args.hidden, args.layers, repeats))
            print(table(rows[-1:]), flush=True) if len(rows) == 1 else print(
                "  ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in rows[-1].values()), flush=True)
    print()
    print(table(rows))
    k1 = [r for r in rows if r["system"] == "chunkflow K=1"]
    flat = [r["activation_MiB"] for r in k1 if r["multiple"] >= 4]
    summary = {"k1_activation_growth_4x_to_max": max(flat) / min(flat)}
    for m in multiples:
        at = {r["system"]: r for r in rows if r["multiple"] == m}
        summary[f"{m}x"] = {
            "k1_speed_vs_full_ckpt": at["chunkflow K=1"]["tokens_per_s"] / at["full+ckpt"]["tokens_per_s"],
            "kN_speed_vs_full": at["chunkflow K=N"]["tokens_per_s"] / at["full"]["tokens_per_s"],
            "k1_activation_vs_full": at["chunkflow K=1"]["activation_MiB"] / at["full"]["activation_MiB"],
        }
    print("\nsummary:", summary)
    path = save_json("memory.json", {"config": vars(args), "rows": rows, "summary": summary})
    _plot(rows, RESULTS / "memory.png")
    print(f"wrote {path} and {RESULTS / 'memory.png'}")


if __name__ == "__main__":
    main()
