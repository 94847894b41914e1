"""Activation memory and speed of one training step vs. sequence length (single process, CPU).

    python benchmarks/bench_memory.py            # hidden 256, 4 layers, chunk 256: 2x..64x -> memory.json
    python benchmarks/bench_memory.py --quick
    python benchmarks/bench_memory.py --hidden 512 --chunk_size 1024 --multiples 2,4,8 \
        --out memory_realistic.json                # realistic shapes for a CPU

For one sequence of L = m x chunk_size tokens, one forward+backward of a tiny Qwen2
(vocab 512, 4 query / 2 KV heads, float32, one thread), each system as a stock user runs it:
* full       : the whole sequence in one call, transformers' own SDPA attention (the CPU
               flash kernel, causal, native GQA) and its own loss (``labels=``: all logits, CE mean);
* full+ckpt  : the same with transformers' (non-reentrant) gradient checkpointing on every layer;
* chunkflow  : ``chunked_step`` at K=1, K=2 and K=N (every chunk kept): the same CPU flash
               kernel per block, the loss on target rows only, in pieces.

Activation bytes are those autograd holds (saved-tensor hooks, per unique storage,
parameters excluded, peak over the step); the K/V state (and its gradient buffer) is
reported on its own, both from the warm-up step (the only one with the meter's hooks). Each
point runs in a fresh process so peak RSS is its own. Speed is the median of ``--repeats``
unmetered steps after that warm-up, by wall clock (``tokens_per_s``) and by
the process's CPU time (``tokens_per_cpu_s``: the steadier figure when other jobs share the
cores). ``recompute_fraction`` is measured, the same way for every system: 1 - L / (tokens
that went through the first decoder layer's MLP).
Writes benchmarks/results/<--out> (default memory.json) and a .png of the same stem.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import in_fresh_process, save_json, table  # noqa: E402


def _model(hidden: int, layers: int):
    from ds_chunkflow.testing.models import build_tiny_model

    return build_tiny_model("qwen2", vocab_size=512, hidden_size=hidden, num_layers=layers)


def _sequence(n: int):
    import torch

    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 512, (n,), generator=g)
    return [{"input_ids": ids, "labels": ids.clone()}]


def _full_step(model, seqs, meter):
    """The stock step: the model's forward with ``labels`` (its own loss: fp32 logits of every row, CE mean)."""
    from ds_chunkflow.runtime.memory import saved_tensor_hooks

    s = seqs[0]
    with saved_tensor_hooks(meter):
        loss = model(input_ids=s["input_ids"][None], labels=s["labels"][None], use_cache=False).loss
    loss.backward()


def _count_layer_tokens(model) -> list[int]:
    """A counter of the tokens the first decoder layer's MLP sees, checkpoint recomputes included (a hook on
    the layer itself would miss them: transformers' checkpointing re-runs the layer's ``forward``, not its call)."""
    counter = [0]
    model.model.layers[0].mlp.register_forward_pre_hook(
        lambda _module, args: counter.__setitem__(0, counter[0] + args[0].shape[1]))
    return counter


def _point(system: str, multiple: int, chunk: int, hidden: int, layers: int, repeats: int, queue) -> None:
    import torch

    from ds_chunkflow import chunked_step
    from ds_chunkflow.runtime.memory import ActivationMeter, peak_rss_bytes

    torch.set_num_threads(1)
    model = _model(hidden, layers)
    seqs = _sequence(multiple * chunk)
    keep = {"chunkflow K=1": 1, "chunkflow K=2": 2, "chunkflow K=N": multiple}.get(system)
    if system == "full+ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    layer_tokens = _count_layer_tokens(model)
    walls, cpus, meter, state = [], [], ActivationMeter(), 0
    for i in range(repeats + 1):  # the first is warm-up, and the only one metered (hooks cost time)
        model.zero_grad(set_to_none=True)
        layer_tokens[0] = 0
        start, start_cpu = time.perf_counter(), time.process_time()
        if keep is None:
            _full_step(model, seqs, meter if i == 0 else None)
        else:
            state = chunked_step(model, seqs, chunk_size=chunk, keep_chunks=keep,
                                 meter=meter if i == 0 else None).peak_state_bytes
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    tokens = multiple * chunk
    wall, cpu = statistics.median(walls[1:]), statistics.median(cpus[1:])
    queue.put(dict(system=system, multiple=multiple, tokens=tokens, activation_MiB=meter.peak / 2**20,
                   kv_state_MiB=state / 2**20, peak_rss_MiB=peak_rss_bytes() / 2**20,
                   step_s=wall, tokens_per_s=tokens / wall, cpu_s=cpu, tokens_per_cpu_s=tokens / cpu,
                   recompute_fraction=1 - tokens / layer_tokens[0]))


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
    parser.add_argument("--multiples", type=lambda s: [int(m) for m in s.split(",")], default=None,
                        help="sequence lengths as multiples of chunk_size, comma-separated (default 2,4,8,16,32,64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per point (median), after one warm-up")
    parser.add_argument("--out", default="memory.json", help="JSON name under benchmarks/results (and its .png)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    multiples = args.multiples or ([2, 4, 16] if args.quick else [2, 4, 8, 16, 32, 64])
    repeats = 1 if args.quick else args.repeats
    systems = ["full", "full+ckpt", "chunkflow K=1", "chunkflow K=2", "chunkflow K=N"]
    rows = []
    for m in multiples:
        for system in systems:
            rows.append(run_point(system, m, args.chunk_size, args.hidden, args.layers, repeats))
            print(table(rows[-1:]), flush=True) if len(rows) == 1 else print(
                "  ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in rows[-1].values()), flush=True)
            path = _save(args, multiples, repeats, rows)  # after every point: a stopped run keeps what it measured
    print()
    print(table(rows))
    print("\nsummary:", _summary(rows))
    png = path.with_suffix(".png")
    _plot(rows, png)
    print(f"wrote {path} and {png}")


def _summary(rows: list[dict]) -> dict:
    """Ratios per length, for the lengths whose five systems have all run."""
    k1 = [r["activation_MiB"] for r in rows if r["system"] == "chunkflow K=1" and r["multiple"] >= 4]
    summary = {"k1_activation_growth_4x_to_max": max(k1) / min(k1)} if k1 else {}
    for m in dict.fromkeys(r["multiple"] for r in rows):
        at = {r["system"]: r for r in rows if r["multiple"] == m}
        if len(at) < 5:
            continue
        summary[f"{m}x"] = {
            "k1_speed_vs_full_ckpt": at["chunkflow K=1"]["tokens_per_s"] / at["full+ckpt"]["tokens_per_s"],
            "kN_speed_vs_full": at["chunkflow K=N"]["tokens_per_s"] / at["full"]["tokens_per_s"],
            "k1_cpu_speed_vs_full_ckpt": at["chunkflow K=1"]["tokens_per_cpu_s"] / at["full+ckpt"]["tokens_per_cpu_s"],
            "kN_cpu_speed_vs_full": at["chunkflow K=N"]["tokens_per_cpu_s"] / at["full"]["tokens_per_cpu_s"],
            "k1_recompute_vs_full_ckpt": at["chunkflow K=1"]["recompute_fraction"] / at["full+ckpt"]["recompute_fraction"],
            "k1_activation_vs_full": at["chunkflow K=1"]["activation_MiB"] / at["full"]["activation_MiB"],
        }
    return summary


def _save(args, multiples: list[int], repeats: int, rows: list[dict]):
    config = {**vars(args), "multiples": multiples, "repeats": repeats}
    done = len(rows) == 5 * len(multiples)
    return save_json(args.out, {"config": config, "complete": done, "rows": rows, "summary": _summary(rows)})

if __name__ == "__main__":
    main()
