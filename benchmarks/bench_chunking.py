"""Packing efficiency and data-parallel balance of ChunkFlow's chunking, against the usual baselines.

(a) Packing efficiency = real tokens / computed token slots, for
    * ChunkFlow (``build_chunks``): every chunk is a slot of ``chunk_size`` tokens;
    * padding every micro-batch of B samples (data order) to its longest sample;
    * packing without splitting: BFD into bins of capacity = the longest sequence (what TRL's
      ``bfd`` packing does with ``max_length`` = longest), each bin one slot of that capacity;
    on the tokenised sample data (if present) and on a synthetic LMSysChat-like distribution.
    Also: BFD's standalone chunk count against ``ceil(short tokens / chunk_size)``, all chunks
    against ``ceil(tokens / chunk_size)``, and the wall time of ``build_chunks``.
(b) Data-parallel imbalance (max / mean per rank, by ``CostModel`` cost and by token count) and model
    calls per rank: ChunkFlow's ``assign_to_ranks`` against an equal number of samples per rank in
    data order, dealing short sequences (each rank packs its own, the default) or the batch's packed
    chunks ("packed"), and with sequence parallelism (a dominant group spread over an aligned block of
    up to all ranks, its all-to-all traffic in the cost at two weights). The mean is the compute-only
    mean, so an all-to-all term shows as imbalance.

    python benchmarks/bench_chunking.py [--quick]     # table on stdout, JSON in benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ds_chunkflow.plan.chunking import (  # noqa: E402
    Chunk,
    CostModel,
    Segment,
    assign_to_ranks,
    build_chunks,
    imbalance,
    plan_layout,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "examples", "data", "sample_sft.jsonl")
RESULTS = os.path.join(ROOT, "benchmarks", "results", "chunking.json")
CHUNK_SIZES = (4096, 8192)
MICRO_BATCHES = (4, 8)
MAX_LEN = 131072


def lmsys_like_lengths(n: int, seed: int) -> list[int]:
    """Log-normal body (median 350, sigma 0.95) plus a 0.15% log-uniform tail over 4K..128K.

    Calibrated to LMSysChat1M's shape: ~87% under 1K tokens, ~99.35% under 4K, longest ~128K.
    """
    rng = np.random.default_rng(seed)
    body = rng.lognormal(math.log(350), 0.95, size=n)
    tail = np.exp(rng.uniform(math.log(4096), math.log(MAX_LEN), size=n))
    return np.clip(np.where(rng.random(n) < 0.0015, tail, body), 1, MAX_LEN).astype(int).tolist()


def sample_lengths() -> tuple[list[int] | None, str]:
    """Token counts of the sample SFT data with the toy tokenizer, or None and why not."""
    if not os.path.exists(SAMPLE):
        return None, f"skipped: {os.path.relpath(SAMPLE, ROOT)} not found"
    try:
        from ds_chunkflow.data.jsonl import load_jsonl
        from ds_chunkflow.testing.tokenizer import build_tokenizer
    except ImportError as e:
        return None, f"skipped: {e}"
    data = load_jsonl(SAMPLE, build_tokenizer())
    return [len(data[i]["input_ids"]) for i in range(len(data))], "toy tokenizer, ds_chunkflow.data.jsonl.load_jsonl"


# --------------------------------------------------------------------------- (a) packing


def padded_slots(lengths: list[int], micro_batch: int) -> int:
    """Slots when each micro-batch of ``micro_batch`` samples (data order) pads to its longest."""
    return sum(len(lengths[i:i + micro_batch]) * max(lengths[i:i + micro_batch]) for i in range(0, len(lengths), micro_batch))


def packing_rows(name: str, lengths: list[int]) -> list[dict]:
    total, longest = sum(lengths), max(lengths)
    rows = []
    for c in CHUNK_SIZES:
        layout = build_chunks(lengths, c)
        short_total = sum(n for n in lengths if n <= c)
        rows.append(dict(data=name, method=f"chunkflow C={c}", efficiency=layout.packing_efficiency,
                         chunks=layout.num_chunks, lower_bound=layout.lower_bound_chunks(),
                         standalone=len(layout.standalone), standalone_lower_bound=math.ceil(short_total / c)))
    for b in MICRO_BATCHES:
        rows.append(dict(data=name, method=f"pad to longest, B={b}", efficiency=total / padded_slots(lengths, b)))
    bins = len(build_chunks(lengths, longest).standalone)  # nothing is longer than the capacity: no split
    rows.append(dict(data=name, method=f"BFD no split, cap={longest}", efficiency=total / (bins * longest),
                     chunks=bins, lower_bound=math.ceil(total / longest)))
    return rows


def time_build_chunks(lengths: list[int], chunk_size: int, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        build_chunks(lengths, chunk_size)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# --------------------------------------------------------------------------- (b) balance


def by_sample_count(lengths: list[int], num_ranks: int, cost: CostModel) -> dict:
    """Equal sample counts per rank in data order; a sample costs its whole causal sequence."""
    costs, tokens = [], []
    for part in np.array_split(np.arange(len(lengths)), num_ranks):
        lens = [lengths[i] for i in part]
        costs.append(sum(cost.chunk_cost(Chunk((Segment(0, 0, n),))) for n in lens))
        tokens.append(sum(lens))
    return dict(costs=costs, tokens=tokens)


def by_chunkflow(lengths: list[int], num_ranks: int, cost: CostModel, chunk_size: int, spread: bool,
                 sp_max_size: int = 1) -> dict:
    """``plan_layout`` (short sequences dealt, each rank packs its own; with sequence parallelism a short
    sequence above ``split_size`` may become a group), or (not ``spread``) ``build_chunks`` and
    ``assign_to_ranks`` dealing the batch's packed chunks, the assignment before issue 26.

    ``bound``: max(largest indivisible item, mean) / mean, the best any assignment of these items reaches
    (items: whole groups unless sequence parallelism may spread them; short sequences, or packed chunks).
    ``calls``: model calls (chunks) per rank. With sequence parallelism a spread group's per-rank cost
    includes its all-to-all term (``CostModel.group_cost``) and the mean is the compute-only mean, so the
    all-to-all shows as imbalance."""
    if spread:
        layout, shares = plan_layout(lengths, chunk_size, num_ranks, cost, sp_max_size)
    else:
        layout = build_chunks(lengths, chunk_size)
        shares = assign_to_ranks(layout, num_ranks, cost, sp_max_size, spread=False)
    mean = cost.layout_cost(layout) / num_ranks
    items = [cost.chunk_cost(Chunk((s,))) for c in layout.standalone for s in c.segments] if spread else [
        cost.chunk_cost(c) for c in layout.standalone]
    if sp_max_size == 1:
        items += [cost.group_cost(g) for g in layout.groups]
    return dict(costs=[s.cost for s in shares], tokens=[s.num_tokens for s in shares], mean=mean,
                bound=max(max(items, default=0.0), mean) / mean, calls=[s.num_chunks for s in shares])


SP_ALL_TO_ALL = (0.1, 1.0)
"""all-to-all cost weights simulated: ~NVLink within a node, ~InfiniBand across nodes."""


def balance_rows(batch_sizes, num_batches: int, seed: int) -> list[dict]:
    cost = CostModel()
    rows = []
    for batch_size in batch_sizes:
        batches = [lmsys_like_lengths(batch_size, seed + 1000 + k) for k in range(num_batches)]
        for num_ranks in (8, 64):
            methods = {"by sample count": lambda b, m=num_ranks: by_sample_count(b, m, cost)}
            for spread, tag in ((False, " packed"), (True, "")):
                for c in CHUNK_SIZES:
                    methods[f"chunkflow C={c}{tag}"] = lambda b, m=num_ranks, c=c, sp=spread: by_chunkflow(b, m, cost, c, sp)
            for spread, tag in ((False, " packed"), (True, "")):
                for c in CHUNK_SIZES:
                    for w in SP_ALL_TO_ALL:
                        methods[f"chunkflow+SP C={c} a2a={w}{tag}"] = (
                            lambda b, m=num_ranks, c=c, sc=CostModel(all_to_all=w), sp=spread:
                            by_chunkflow(b, m, sc, c, sp, m))
            for method, run in methods.items():
                res = [run(b) for b in batches]
                cost_imb = [max(r["costs"]) / r["mean"] if "mean" in r else imbalance(r["costs"]) for r in res]
                token_imb = [imbalance(r["tokens"]) for r in res]
                calls = "calls" in res[0]
                rows.append(dict(batch=batch_size, ranks=num_ranks, method=method, batches=num_batches,
                                 cost_mean=statistics.mean(cost_imb), cost_worst=max(cost_imb),
                                 cost_bound_mean=statistics.mean(r["bound"] for r in res) if calls else None,
                                 tokens_mean=statistics.mean(token_imb), tokens_worst=max(token_imb),
                                 calls_max=statistics.mean(max(r["calls"]) for r in res) if calls else None,
                                 calls_mean=statistics.mean(statistics.mean(r["calls"]) for r in res) if calls else None))
    return rows


# --------------------------------------------------------------------------- report


def describe(lengths: list[int]) -> dict:
    a = np.asarray(lengths)
    return dict(n=len(a), tokens=int(a.sum()), under_1k=float((a < 1024).mean()), under_4k=float((a < 4096).mean()),
                median=float(np.median(a)), longest=int(a.max()))


def print_tables(result: dict) -> None:
    print("(a) packing efficiency = real tokens / computed token slots")
    for name, d in result["datasets"].items():
        extra = f"{d['n']} seqs, {d['tokens']} tokens, <1K {d['under_1k']:.2%}, <4K {d['under_4k']:.2%}, longest {d['longest']}"
        print(f"  {name}: {extra}" if "n" in d else f"  {name}: {d['note']}")
    print(f"  {'data':<12} {'method':<26} {'efficiency':>10} {'chunks':>8} {'ceil(T/C)':>9} {'standalone':>10} {'ceil(S/C)':>9}")
    for r in result["packing"]:
        cells = [f"{r[k]:>{w}}" if k in r else " " * w for k, w in
                 (("chunks", 8), ("lower_bound", 9), ("standalone", 10), ("standalone_lower_bound", 9))]
        print(f"  {r['data']:<12} {r['method']:<26} {r['efficiency']:>10.2%} " + " ".join(cells))
    for k, v in result["build_chunks_seconds"].items():
        print(f"  build_chunks wall time, {k}: {v * 1e3:.1f} ms (median of 3)")
    print("\n(b) data-parallel imbalance, max/mean per rank (mean and worst over batches)")
    print("  (chunkflow: plan_layout, short sequences dealt to ranks, each rank packs its own, and with SP a short")
    print("   sequence above split_size may be cut into a group; 'packed': the batch's packed chunks dealt as items,")
    print("   the assignment before issue 26)")
    print("  (bound: max(largest indivisible item, mean) / mean, the best any assignment of those items reaches;")
    print("   with SP a group is divisible, a short sequence or packed chunk is not)")
    print("  (chunkflow+SP: a group may be spread over up to all ranks, its all-to-all traffic counted at a2a x tokens;")
    print("   the mean is the compute-only mean)")
    print("  (calls: model calls (chunks) per rank, the busiest rank's (every rank runs as many steps) and the mean)")
    print(f"  {'batch':>5} {'ranks':>5} {'method':<36} {'cost mean':>9} {'worst':>7} {'bound':>7} {'tokens mean':>11}"
          f" {'worst':>7} {'calls max':>9} {'mean':>6}")
    for r in result["balance"]:
        bound = "" if r["cost_bound_mean"] is None else f"{r['cost_bound_mean']:.3f}"
        calls = "" if r.get("calls_max") is None else f"{r['calls_max']:>9.2f} {r['calls_mean']:>6.2f}"
        print(f"  {r['batch']:>5} {r['ranks']:>5} {r['method']:<36} {r['cost_mean']:>9.3f} {r['cost_worst']:>7.3f}"
              f" {bound:>7} {r['tokens_mean']:>11.3f} {r['tokens_worst']:>7.3f} {calls}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k synthetic sequences and fewer batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    n = 10_000 if args.quick else 100_000
    synthetic = lmsys_like_lengths(n, args.seed)
    datasets, packing = {}, []
    sample, note = sample_lengths()
    if sample is None:
        datasets["sample_sft"] = dict(note=note)
    else:
        datasets["sample_sft"] = dict(describe(sample), note=note)
        packing += packing_rows("sample_sft", sample)
    datasets["lmsys-like"] = dict(describe(synthetic), note=f"synthetic, seed {args.seed}")
    packing += packing_rows("lmsys-like", synthetic)
    timings = {f"{n} seqs, C={c}": time_build_chunks(synthetic, c) for c in CHUNK_SIZES}
    balance = balance_rows((512, 4096), 3 if args.quick else 20, args.seed)

    result = dict(quick=args.quick, seed=args.seed, datasets=datasets, packing=packing,
                  build_chunks_seconds=timings, balance=balance, wall_seconds=time.perf_counter() - start)
    print_tables(result)
    print(f"\ntotal {result['wall_seconds']:.1f} s")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {os.path.relpath(args.output, ROOT)}")
    return result


if __name__ == "__main__":
    main()
