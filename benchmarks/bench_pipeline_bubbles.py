"""Pipeline bubbles: plain 1F1B vs ChunkFlow's state-aware 1F1B (simulated, pure CPU).

    python benchmarks/bench_pipeline_bubbles.py [--batches 8] [--search 200]

1. The paper's worked example (4 stages, sequences of 4, 2, 1, 1 units): plain 1F1B, four equal
   micro-batches, ChunkFlow with chunk_size 2 at K=1, 2 next to the paper's 54.1% / 47.8%.
2. Heavy-tailed global batches of 256 sequences, LMSysChat-like (synthetic, seeded): about 87%
   under 1K tokens, 99.35% under 4K, a tail up to 128K. Plain 1F1B with one micro-batch per
   sequence vs ChunkFlow at K=1, 2, 4, at 4 and 8 stages, chunk_size 4K and 8K, with the
   attention term off and on (1 / (6 x 4096) per query-key pair, i.e. hidden size 4096).

Bubble = idle stage-time / (stages x makespan); recomputes count as busy time, so the table
also gives the speed-up in makespan over plain 1F1B and the peak activation tokens one stage
holds (worst batch: what memory must be sized for).
Writes benchmarks/results/pipeline_bubbles.json (and .png when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ds_chunkflow.pipeline import simulate

RESULTS = Path(__file__).parent / "results"
ATTENTION = 1.0 / (6 * 4096)
PAPER = {1: 0.541, 2: 0.478}


def lmsys_like(num: int, rng: np.random.Generator) -> list[int]:
    """Log-normal mixture: chat turns (median 280), longer answers (median 1.4K), a log-uniform
    tail 4K..128K (0.5%). Over 1M draws: 87.0% < 1K, 99.34% < 4K, mean ~690 tokens."""
    comp = rng.choice(3, size=num, p=[0.905, 0.09, 0.005])
    short = rng.lognormal(np.log(280), 0.85, num)
    medium = rng.lognormal(np.log(1400), 0.45, num)
    tail = np.exp(rng.uniform(np.log(4096), np.log(131072), num))
    return np.clip(np.where(comp == 0, short, np.where(comp == 1, medium, tail)), 8, 131072).astype(int).tolist()


def gantt(result, width: int = 66) -> str:
    """One text row per stage: F/S/R/B letters (micro-batch digit for F/B), '.' for idle."""
    scale = width / result.makespan
    rows = []
    for s, row in enumerate(result.timeline):
        line = ["."] * width
        for a, b, kind, mb in row:
            for x in range(round(a * scale), round(b * scale)):
                line[x] = kind if kind in "SR" else (str(mb) if kind == "F" else chr(ord("a") + mb))
        rows.append(f"  stage {s} |{''.join(line)}|")
    return "\n".join(rows) + "\n  (digit = forward of micro-batch n, letter = its backward, S/R = state-only/recompute)"


def paper_example() -> list[dict]:
    rows = [
        {"case": "plain 1F1B, lengths 4,2,1,1", "bubble": simulate([4, 2, 1, 1], 4).bubble_ratio, "paper": 0.5714},
        {"case": "plain 1F1B, lengths 2,2,2,2", "bubble": simulate([2, 2, 2, 2], 4).bubble_ratio, "paper": 0.4286},
    ]
    for k in (1, 2):
        naive = simulate([4, 2, 1, 1], 4, chunk_size=2, keep_chunks=k, strategy="given")
        best = simulate([4, 2, 1, 1], 4, chunk_size=2, keep_chunks=k)
        rows.append({"case": f"ChunkFlow chunk 2, K={k}", "bubble": best.bubble_ratio, "paper": PAPER[k],
                         "given_order": naive.bubble_ratio, "strategy": best.plan.strategy,
                         "makespan": best.makespan, "forward": [repr(op) for op in best.plan.forward]})
    print("Paper example (4 stages; forward = tokens, backward = 2x, recompute = 1x)")
    print(f"  {'case':32s} {'ours':>8s} {'paper':>8s}")
    for r in rows:
        print(f"  {r['case']:32s} {r['bubble']:8.2%} {r['paper']:8.2%}")
    for k in (1, 2):
        print(f"\nChunkFlow K={k} timeline (micro-batches 0,1 = the 4-unit sequence's chunks):")
        print(gantt(simulate([4, 2, 1, 1], 4, chunk_size=2, keep_chunks=k)))
    return rows


def heavy_tailed(num_batches: int, search_iters: int) -> list[dict]:
    rng = np.random.default_rng(2025)
    batches = [lmsys_like(256, rng) for _ in range(num_batches)]
    lens = np.concatenate(batches)
    print(f"\nHeavy-tailed batches: {num_batches} x 256 sequences, {np.mean(lens < 1024):.1%} < 1K, "
          f"{np.mean(lens < 4096):.2%} < 4K, longest per batch {[max(b) for b in batches]}")
    methods = [("1F1B", 1, 0)] + [(f"K={k}", k, 0) for k in (1, 2, 4)]
    if search_iters:
        methods += [(f"K={k}+search", k, search_iters) for k in (1, 2, 4)]
    rows = []
    head = f"  {'stages':>6s} {'chunk':>6s} {'attn':>4s} {'method':12s} {'bubble':>7s} {'speed-up':>8s} {'peak act':>9s}"
    print(head + "   (bubble, speed-up: means over batches, speed-up = plain makespan / makespan;"
                 " peak act: activation tokens held by one stage, worst batch)")
    for stages in (4, 8):
        for chunk_size in (4096, 8192):
            for attention in (0.0, ATTENTION):
                plain = [simulate(b, stages, attention_cost=attention) for b in batches]
                for name, keep, search in methods:
                    t0 = time.perf_counter()
                    if name == "1F1B":
                        res = plain
                    else:
                        res = [simulate(b, stages, chunk_size, keep, attention_cost=attention, search_iters=search)
                               for b in batches]
                    row = {"stages": stages, "chunk_size": chunk_size, "attention": attention > 0, "method": name,
                               "bubble": float(np.mean([r.bubble_ratio for r in res])),
                               "speedup": float(np.mean([p.makespan / r.makespan for p, r in zip(plain, res)])),
                               "peak_activation_tokens": max(max(r.peak_in_flight_tokens) for r in res),
                               "recompute_share": float(np.mean([r.recompute_time / r.busy_time for r in res])),
                               "seconds_per_plan": (time.perf_counter() - t0) / len(batches)}
                    rows.append(row)
                    print(f"  {stages:6d} {chunk_size:6d} {'on' if attention else 'off':>4s} {name:12s} "
                          f"{row['bubble']:7.2%} {row['speedup']:7.2f}x {row['peak_activation_tokens']:9.0f}")
    return rows


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, attention in zip(axes, (False, True)):
        sel = [r for r in rows if r["attention"] == attention]
        methods = list(dict.fromkeys(r["method"] for r in sel))
        configs = list(dict.fromkeys((r["stages"], r["chunk_size"]) for r in sel))
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            ys = [next(r["bubble"] for r in sel if r["method"] == m and (r["stages"], r["chunk_size"]) == c)
                  for c in configs]
            ax.bar(np.arange(len(configs)) + i * width, ys, width, label=m)
        ax.set_xticks(np.arange(len(configs)) + 0.4 - width / 2, [f"P={p}\nchunk {c // 1024}K" for p, c in configs])
        ax.set_title(f"attention term {'on' if attention else 'off'}")
        ax.set_ylabel("bubble ratio")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("Pipeline bubbles on LMSysChat-like batches: 1F1B vs ChunkFlow")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8, help="global batches to average over")
    parser.add_argument("--search", type=int, default=200, help="local-search steps for the +search rows (0: none)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    out = {"paper_example": paper_example(), "heavy_tailed": heavy_tailed(args.batches, args.search)}
    path = RESULTS / "pipeline_bubbles.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {path}" + (f" and {path.with_suffix('.png')}" if plot(out["heavy_tailed"], path.with_suffix(".png"))
                              else ""))


if __name__ == "__main__":
    main()
