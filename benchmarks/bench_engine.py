"""End-to-end training throughput and memory: ChunkFlowEngine against two DeepSpeed baselines.

    OMP_NUM_THREADS=1 python benchmarks/bench_engine.py            # full (~4 min on 2 idle cores)
    OMP_NUM_THREADS=1 python benchmarks/bench_engine.py --quick    # smoke run (< 1 min)

Two gloo ranks (DeepSpeed's CPU accelerator, spawned by ``ds_chunkflow.testing.spawn``), a tiny
random Qwen2, ZeRO-2, fp32, a client ``torch.optim.AdamW``, ``gradient_clipping: 0``.
Every system trains on the same global batches (``--global_batch`` chat samples of
``examples/data/sample_sft.jsonl``, seeded shuffle) with the same objective
``sum(CE over loss tokens) / loss tokens of the global batch``, so their losses must agree:

* ``chunkflow``      ``ds_chunkflow.initialize`` + ``engine.train_batch(sequences)``
                     (``--keep_chunks``; ``chunkflow_k4``: the same with keep_chunks 4;
                     ``chunkflow_sp``: with ``sequence_parallel.max_size: 2``, so the cost model
                     may spread a dominant sample over both ranks; ``chunkflow_sp_k4``: both);
* ``padded``         (a) plain ``deepspeed.initialize``; each rank takes every W-th sample
                     (DistributedSampler), micro-batches of ``--micro_batch`` samples padded
                     to their longest, attention_mask for the padding;
* ``packed``         (b) each rank's samples BFD-packed (no splitting) into rows of at most
                     the longest sample of the data, position_ids restarting per sample and
                     ``attention_mask=None``: transformers 5 detects the packing and gives SDPA
                     a block-diagonal mask; full activation checkpointing;
* ``packed_varlen``  (b) with attention run per packed sample (what flash-attn varlen does on
                     a GPU); CPU SDPA with a mask computes the whole row x row score matrix.

Rows per rank differ in (b); the shorter rank adds one-token micro-batches without loss,
because ZeRO-2 reduces gradients at every backward and ranks must issue the same calls.
Each system runs in fresh processes (peak RSS is per process). One warm-up step (on short
samples), then ``--steps`` timed steps with a barrier before and after each.

Columns: ``tokens_per_s`` real (non-pad) tokens over the timed wall clock; ``tokens_per_core_s`` over
the CPU seconds of all ranks together (the per-core rate); ``machine_limit_ratio`` tokens_per_s over
the best per-core rate of the run times the 2 ranks (what the machine could do if every core ran at
that rate all the time);
``tokens_per_cpu_s`` the same over the sum of each step's slowest rank's CPU time (gloo
waits block, so this is the critical path of own work; it holds when other jobs share
the cores); ``peak_rss_mib`` max over ranks, ``train_rss_mib`` its rise above the RSS
after initialisation; ``imb_*`` max / mean over ranks, averaged over steps, of CPU time,
real tokens, and ChunkFlow's ``CostModel`` cost of the real samples; ``meeting_eff_model`` (ChunkFlow under
ZeRO-2, where every backward meets the other ranks' to reduce gradients) the busiest rank's modelled work over
the plans' modelled time with those meetings (``plan.schedule.barrier_makespan``); ``collective_s`` seconds per
step and rank inside ``torch.distributed`` collectives (all-reduce, all-to-all, ZeRO's reductions and gathers),
``collective_wait_s`` the part of it spent waiting for the other rank (per call, beyond the shorter rank's
time), ``collective_by_kind`` by collective; ``computed_per_real``
token slots computed (padding included) per real token; ``max_loss_diff`` against the
first system. Writes benchmarks/results/engine.json (``--quick``: engine_quick.json).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]
from _common import load_samples, num_loss_tokens, rss_bytes, save_json, table, targets_of  # noqa: E402

MODEL = {"family": "qwen2", "vocab_size": 512, "hidden_size": 128, "num_layers": 4}  # --hidden/--layers/--vocab
SYSTEMS = ("chunkflow", "chunkflow_k4", "chunkflow_sp", "chunkflow_sp_k4", "padded", "packed", "packed_varlen")
SP_SIZE = 2  # chunkflow_sp: sequence_parallel.max_size (both ranks)
BASELINES = ("padded", "packed", "packed_varlen")
VARLEN = "bench_varlen"


# ----------------------------------------------------------------------------- data (pure)
def make_batches(samples: list[dict], global_batch: int, steps: int, seed: int):
    """(warm-up batch, timed batches): a seeded shuffle cut into global batches; the warm-up
    batch is the next slice without samples over 2048 tokens (cheap, same for every system)."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    if (steps + 1) * global_batch > len(order):
        raise ValueError(f"{steps} steps + 1 warm-up of {global_batch} samples need more than {len(order)} samples")
    batches = [[samples[i] for i in order[s * global_batch:(s + 1) * global_batch]] for s in range(steps)]
    rest = order[steps * global_batch:(steps + 1) * global_batch]
    warmup = [samples[i] for i in rest if len(samples[i]["input_ids"]) <= 2048]
    return warmup, batches


def long_sample(n: int, seed: int) -> dict:
    """A synthetic ``n``-token sample (ids < 512, any vocabulary embeds them); loss on all but its first 10%."""
    g = torch.Generator().manual_seed(10_000 + seed)
    ids = torch.randint(3, 512, (n,), generator=g).tolist()
    cut = n // 10
    return {"input_ids": ids, "labels": [-100] * cut + ids[cut:]}


def rank_share(batch: list[dict], rank: int, world: int) -> list[dict]:
    return batch[rank::world]  # DistributedSampler without shuffle


def padded_micro_batches(batch, rank, world, micro_batch, pad_id):
    """(a): rows of one micro-batch right-padded to its longest sample."""
    share = rank_share(batch, rank, world)
    out = []
    for i in range(0, len(share), micro_batch):
        group = share[i:i + micro_batch]
        t = max(len(s["input_ids"]) for s in group)
        pad = [t - len(s["input_ids"]) for s in group]
        out.append({"input_ids": [s["input_ids"] + [pad_id] * p for s, p in zip(group, pad)],
                    "targets": [targets_of(s["labels"]) + [-100] * p for s, p in zip(group, pad)],
                    "attention_mask": [[1] * len(s["input_ids"]) + [0] * p for s, p in zip(group, pad)],
                    "segments": None})
    return out


def packed_rows(batch, rank, world, row_len):
    """(b): the rank's samples best-fit-decreasing into rows of <= row_len tokens (padding-free)."""
    from ds_chunkflow.plan.chunking import best_fit_decreasing

    share = rank_share(batch, rank, world)
    bins = best_fit_decreasing([(len(s["input_ids"]), i) for i, s in enumerate(share)], row_len)
    out = []
    for b in bins:
        seqs = [share[i] for i in b]
        out.append({"input_ids": [concat(s["input_ids"] for s in seqs)],
                    "targets": [concat(targets_of(s["labels"]) for s in seqs)],
                    "position_ids": [concat(range(len(s["input_ids"])) for s in seqs)],
                    "segments": [len(s["input_ids"]) for s in seqs]})
    return out


def concat(lists) -> list:
    return list(itertools.chain.from_iterable(lists))


def micro_batches(system, batch, rank, world, cfg):
    if system == "padded":
        mbs = [padded_micro_batches(batch, r, world, cfg["micro_batch"], cfg["pad_id"]) for r in range(world)]
    else:
        mbs = [packed_rows(batch, r, world, cfg["row_len"]) for r in range(world)]
    n = max(len(m) for m in mbs)
    filler = {"input_ids": [[cfg["pad_id"]]], "targets": [[-100]], "position_ids": [[0]], "segments": [1]}
    return mbs[rank] + [filler] * (n - len(mbs[rank]))  # equal backward calls on every rank (ZeRO-2)


def chunkflow_options(system: str, cfg) -> tuple[int, int]:
    """(keep_chunks, sequence_parallel.max_size) of a ChunkFlow system: ``chunkflow[_sp][_k<K>]``."""
    keep = int(system.rsplit("_k", 1)[1]) if "_k" in system else cfg["keep_chunks"]
    return keep, SP_SIZE if "_sp" in system else 1


def work_per_rank(system, batch, world, cfg) -> list[dict]:
    """Real tokens, computed token slots and modelled cost (ChunkFlow's CostModel) per rank."""
    from ds_chunkflow.plan.chunking import CostModel
    from ds_chunkflow.plan.schedule import barrier_makespan, barrier_segments
    from ds_chunkflow.runtime.batch_plan import plan_batch

    cost = CostModel(attention=1.0 / (6 * cfg["model"]["hidden_size"]))  # the engine's default weight
    if system.startswith("chunkflow"):
        keep, sp = chunkflow_options(system, cfg)
        seqs = [{k: torch.tensor(v) for k, v in s.items()} for s in batch]
        cost = replace(cost, keep_chunks=keep)
        plan = plan_batch(seqs, chunk_size=cfg["chunk_size"], keep_chunks=keep, num_ranks=world, cost=cost,
                          sp_max_size=sp, forwards_collective=cfg["zero_stage"] == 3,
                          backwards_collective=cfg["zero_stage"] == 2)  # the engine's plans
        # ZeRO-2: every backward meets; the busiest rank's own work / the plans' time with those meetings
        meet = {"own": max(sum(barrier_segments(p, cost)) for p in plan.rank_plans),
                "met": barrier_makespan(plan.rank_plans, cost)} if cfg["zero_stage"] == 2 else {}
        return [{"real": s.num_tokens, "computed": s.num_tokens, "cost": s.cost, **meet} for s in plan.shares]
    out = []
    for r in range(world):
        lens = [len(s["input_ids"]) for s in rank_share(batch, r, world)]
        mbs = micro_batches(system, batch, r, world, cfg)
        computed = sum(len(m["input_ids"]) * len(m["input_ids"][0]) for m in mbs)
        pairs = sum(n * (n + 1) / 2 for n in lens)  # causal (query, key) pairs of the real samples
        out.append({"real": sum(lens), "computed": computed, "cost": sum(lens) + cost.attention * pairs})
    return out


# ----------------------------------------------------------------------------- inside a rank
COLLECTIVES = ("all_reduce", "all_to_all_single", "all_to_all", "reduce_scatter_tensor", "reduce_scatter", "reduce",
               "all_gather_into_tensor", "all_gather", "broadcast")


@contextlib.contextmanager
def collective_times():
    """Wall seconds inside each ``torch.distributed`` collective this process calls (DeepSpeed's comm layer
    calls them too): a list of ``(name, seconds)`` in call order, filled while the block runs."""
    import torch.distributed as dist

    calls: list[tuple[str, float]] = []
    originals = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}

    def timed(name, fn):
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                calls.append((name, time.perf_counter() - t))
        return call

    for name, fn in originals.items():
        setattr(dist, name, timed(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, segments=None, **kwargs):
    """Causal SDPA per packed sample (no cross-sample scores), like flash-attn varlen."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv

    rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, rep), repeat_kv(value, rep)
    outs, start = [], 0
    for n in segments:
        s = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(query[:, :, s], key[:, :, s], value[:, :, s], is_causal=True,
                                                   scale=scaling))
        start += n
    return torch.cat(outs, 2).transpose(1, 2).contiguous(), None


def _engine(system, cfg):
    """(engine, RSS right after loading the model): every system loads the saved model with
    ``ds_chunkflow.load_pretrained`` (partitioned at load under ZeRO-3, so load memory is comparable)."""
    import deepspeed

    import ds_chunkflow

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": cfg["zero_stage"]},
              "steps_per_print": 10**9}
    if system.startswith("chunkflow"):
        keep, sp = chunkflow_options(system, cfg)
        config["chunkflow"] = {"chunk_size": cfg["chunk_size"], "keep_chunks": keep,
                               "pad_token_id": cfg["pad_id"], "recompute_layers": cfg["recompute_layers"]}
        if sp > 1:
            config["chunkflow"]["sequence_parallel"] = {"max_size": sp,
                                                        "longer_chunks": cfg.get("sp_longer_chunks", True)}
    from ds_chunkflow.deepspeed.deepspeed_adapter import decide_shm_comm_build

    decide_shm_comm_build()
    model = ds_chunkflow.load_pretrained(cfg["model_dir"], config)
    load_rss = rss_bytes()
    model.config._attn_implementation = "sdpa"
    if system.startswith("packed"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if system == "packed_varlen":
        from transformers import AttentionInterface

        AttentionInterface.register(VARLEN, varlen_attention)
        model.config._attn_implementation = VARLEN
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    init = ds_chunkflow.initialize if system.startswith("chunkflow") else deepspeed.initialize
    return init(model=model, optimizer=optimizer, config=config)[0], load_rss


def _baseline_step(engine, system, batch, cfg) -> float:
    """One optimizer step of (a) or (b): every micro-batch's backward, one boundary, one step."""
    import torch.distributed as dist
    import torch.nn.functional as F

    world, rank = dist.get_world_size(), dist.get_rank()
    n_loss = num_loss_tokens(batch)
    mbs = micro_batches(system, batch, rank, world, cfg)
    total = 0.0
    for i, mb in enumerate(mbs):
        engine.set_gradient_accumulation_boundary(i == len(mbs) - 1)
        kwargs = {"input_ids": torch.tensor(mb["input_ids"]), "use_cache": False}
        if "attention_mask" in mb:
            kwargs["attention_mask"] = torch.tensor(mb["attention_mask"])
        else:
            kwargs["position_ids"] = torch.tensor(mb["position_ids"])
        if system == "packed_varlen":
            kwargs["segments"] = mb["segments"]
        logits = engine(**kwargs).logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), torch.tensor(mb["targets"]).flatten(), ignore_index=-100,
                               reduction="sum") / n_loss
        engine.backward(loss * world, scale_wrt_gas=False)  # DeepSpeed averages over ranks
        total += loss.item()
    engine.step()
    engine.set_gradient_accumulation_boundary(None)
    t = torch.tensor([total], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def worker(rank, world, system, cfg, warmup, batches, out_prefix):
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside DeepSpeed / transformers

    def to_tensors(batch):
        return [{k: torch.tensor(v) for k, v in s.items()} for s in batch]

    def step(batch):
        if system.startswith("chunkflow"):
            return engine.train_batch(to_tensors(batch)).item()
        return _baseline_step(engine, system, batch, cfg)

    from ds_chunkflow.deepspeed.deepspeed_adapter import count_param_gathers

    t = time.perf_counter()
    engine, load_rss = _engine(system, cfg)
    rec = {"init_s": time.perf_counter() - t, "rss_after_load": load_rss, "rss_after_init": rss_bytes(),
           "step_s": [], "cpu_s": [], "losses": [], "chunkflow": [], "gathers": [], "gather_bytes": [],
           "collectives": []}
    rec["warmup_loss"] = step(warmup)
    profiler = None
    if cfg["profile"] and rank == 0:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    for batch in batches:
        dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        with count_param_gathers() as gathers, collective_times() as collectives:  # ZeRO-3 gathers, every collective
            rec["losses"].append(step(batch))
        rec["collectives"].append(collectives)
        rec["gathers"].append(gathers.calls)
        rec["gather_bytes"].append(gathers.bytes)
        rec["cpu_s"].append(time.process_time() - c)  # gloo waits block, so this is the rank's own work
        dist.barrier()
        rec["step_s"].append(time.perf_counter() - t)
        if system.startswith("chunkflow"):
            rec["chunkflow"].append(engine.last_metrics)
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
        rec["profile"] = buf.getvalue()
    rec["peak_rss"] = rss_bytes()
    Path(f"{out_prefix}.{rank}").write_text(json.dumps(rec))


# ----------------------------------------------------------------------------- driver
def run_system(system, cfg, warmup, batches, world=2) -> list[dict]:
    from ds_chunkflow.testing.spawn import run_ranks  # spawned gloo ranks, OMP_NUM_THREADS=1

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, system)
        run_ranks(worker, system, cfg, warmup, batches, prefix, world=world, timeout=cfg["timeout"])
        return [json.loads(Path(f"{prefix}.{r}").read_text()) for r in range(world)]


def summarise(system, ranks, batches, cfg, world=2) -> dict:
    """Throughput by wall clock and by CPU time (the slowest rank's own work per step: robust to
    other jobs on a shared machine), memory, and data-parallel imbalance (max / mean over ranks)."""
    tokens = sum(len(s["input_ids"]) for b in batches for s in b)
    wall = sum(ranks[0]["step_s"])
    cpu = [[r["cpu_s"][i] for r in ranks] for i in range(len(batches))]
    work = [work_per_rank(system, b, world, cfg) for b in batches]

    def imbalance(per_step):
        return sum(max(v) / (sum(v) / len(v)) for v in per_step) / len(per_step)

    mib = 2**20
    dominant = max(range(len(batches)), key=lambda i: max(len(s["input_ids"]) for s in batches[i]))
    return {
        "system": system,
        "dominant_step": dominant,  # the step holding the longest sample: its tokens / its wall time
        "dominant_step_tokens_per_s": sum(len(s["input_ids"]) for s in batches[dominant]) / ranks[0]["step_s"][dominant],
        "tokens_per_s": tokens / wall,
        "tokens_per_cpu_s": tokens / sum(max(c) for c in cpu),
        "tokens_per_core_s": tokens / sum(sum(c) for c in cpu),  # per CPU-second of all ranks' own work
        "s_per_step": wall / len(batches),
        "peak_rss_mib": max(r["peak_rss"] for r in ranks) / mib,
        "load_rss_mib": max(r["rss_after_load"] for r in ranks) / mib,
        "gathers_per_step": sum(ranks[0]["gathers"]) / len(batches),
        "gather_mib_per_step": sum(ranks[0]["gather_bytes"]) / len(batches) / mib,
        "train_rss_mib": max(r["peak_rss"] - r["rss_after_init"] for r in ranks) / mib,  # peak above the init's
        "imb_cpu": imbalance(cpu),
        "imb_tokens": imbalance([[w["real"] for w in ws] for ws in work]),
        "imb_cost": imbalance([[w["cost"] for w in ws] for ws in work]),
        "computed_per_real": sum(w["computed"] for ws in work for w in ws) / tokens,
        "meeting_eff_model": (sum(ws[0]["own"] for ws in work) / sum(ws[0]["met"] for ws in work)
                              if "met" in work[0][0] else None),
        "losses": ranks[0]["losses"], "step_s": ranks[0]["step_s"], "cpu_s": cpu,
        "init_s": max(r["init_s"] for r in ranks), "per_rank_peak_rss_mib": [r["peak_rss"] / mib for r in ranks],
        "chunkflow_metrics": ranks[0]["chunkflow"], "profile": ranks[0].get("profile"),
        "time_breakdown": time_breakdown(ranks),
        **collective_split(ranks),
    }


def time_breakdown(ranks) -> dict[str, float] | None:
    """A ChunkFlow system's mean seconds per timed step in each part (the engine's ``time_*_s`` step
    metrics), per rank averaged over ranks; None for the baselines, which have no such metrics."""
    steps = [m for r in ranks for m in r["chunkflow"]]
    if not steps:
        return None
    keys = sorted({k for m in steps for k in m if k.startswith("time_") and k.endswith("_s")})
    return {k[len("time_"):-len("_s")]: sum(m.get(k, 0.0) for m in steps) / len(steps) for k in keys}


def collective_split(ranks) -> dict:
    """Seconds per step and rank inside collectives (``collective_s``), and the part of it spent waiting for
    the other rank (``collective_wait_s``): the i-th call of each rank is the same collective, whose transfer
    takes at least the shorter of the two ranks' times; the rest of the longer one is waiting. By kind:
    ``collective_by_kind`` (seconds per step and rank)."""
    steps, world = len(ranks[0]["collectives"]), len(ranks)
    total = wait = 0.0
    kinds: dict[str, float] = {}
    for i in range(steps):
        calls = [r["collectives"][i] for r in ranks]
        for rank_calls in calls:
            for name, sec in rank_calls:
                total += sec
                kinds[name] = kinds.get(name, 0.0) + sec
        if len({tuple(name for name, _ in c) for c in calls}) == 1:  # the same calls in the same order
            for same in zip(*calls):
                least = min(sec for _, sec in same)
                wait += sum(sec - least for _, sec in same)
    per = max(1, steps * world)
    return {"collective_s": total / per, "collective_wait_s": wait / per,
            "collective_by_kind": {k: v / per for k, v in sorted(kinds.items())}}


def data_stats(batches) -> dict:
    lens = sorted(len(s["input_ids"]) for b in batches for s in b)
    return {"num_samples": len(lens), "tokens": sum(lens), "max_len": lens[-1], "median_len": lens[len(lens) // 2],
            "p90_len": lens[int(0.9 * len(lens))],
            "longest_per_step": [max(len(s["input_ids"]) for s in b) for b in batches],
            "tokens_per_step": [sum(len(s["input_ids"]) for s in b) for b in batches]}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 steps of 16 samples <= 2048 tokens, chunk_size 256")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--global_batch", type=int, default=32)
    p.add_argument("--micro_batch", type=int, default=4, help="(a): samples per padded micro-batch")
    p.add_argument("--chunk_size", type=int, default=1024)
    p.add_argument("--keep_chunks", type=int, default=1)
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default=None, help=f"comma-separated, default {','.join(SYSTEMS)} "
                   "(--quick: without the K = 4 systems)")
    p.add_argument("--out", default=None, help="JSON name in benchmarks/results (default engine[_quick].json)")
    p.add_argument("--profile", action="store_true", help="cProfile rank 0 of every system's timed steps")
    p.add_argument("--hidden", type=int, default=MODEL["hidden_size"])
    p.add_argument("--layers", type=int, default=MODEL["num_layers"])
    p.add_argument("--vocab", type=int, default=MODEL["vocab_size"], help="e.g. 151936 (Qwen2.5)")
    p.add_argument("--tied", action="store_true", help="lm_head tied to the embedding (default: separate)")
    p.add_argument("--long_sample", type=int, default=0,
                   help="replace each timed batch's first sample by a synthetic one of this many tokens "
                   "(loss on all but its first 10%%): a heavy tail")
    p.add_argument("--max_len", type=int, default=None, help="use only data samples up to this length")
    p.add_argument("--recompute_layers", default="none", help="chunkflow.recompute_layers for the chunkflow systems")
    p.add_argument("--timeout", type=float, default=600, help="seconds per system")
    args = p.parse_args()
    if args.quick:  # the quick data is short: a small chunk_size still splits some samples
        args.steps, args.global_batch, args.chunk_size = 2, 16, 256
    if args.systems is None:
        args.systems = ",".join(s for s in SYSTEMS if not (args.quick and s.endswith("_k4")))
    return args


def ratios(rows) -> list[dict]:
    """ChunkFlow variant / baseline: throughput (wall, CPU) and peak RSS."""
    by = {r["system"]: r for r in rows}
    pairs = [(c, b) for c in by if c.startswith("chunkflow") for b in BASELINES if b in by]
    for sp, plain in (("chunkflow_sp", "chunkflow"), ("chunkflow_sp_k4", "chunkflow_k4")):
        if sp in by and plain in by:
            pairs.append((sp, plain))  # sequence parallelism: after / before
    return [{"pair": f"{c} / {b}", "tokens_per_s": by[c]["tokens_per_s"] / by[b]["tokens_per_s"],
             "tokens_per_cpu_s": by[c]["tokens_per_cpu_s"] / by[b]["tokens_per_cpu_s"],
             "dominant_step_tokens_per_s": by[c]["dominant_step_tokens_per_s"] / by[b]["dominant_step_tokens_per_s"],
             "peak_rss": by[c]["peak_rss_mib"] / by[b]["peak_rss_mib"]} for c, b in pairs]


def main():
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ds_chunkflow.testing.tokenizer import build_tokenizer

    samples = load_samples(2048 if args.quick else args.max_len)
    warmup, batches = make_batches(samples, args.global_batch, args.steps, args.seed)
    if args.long_sample:
        batches = [[long_sample(args.long_sample, seed=i)] + b[1:] for i, b in enumerate(batches)]
    model_spec = dict(MODEL, hidden_size=args.hidden, num_layers=args.layers, vocab_size=args.vocab,
                      tie_word_embeddings=args.tied)
    from ds_chunkflow.testing.models import build_tiny_model

    model_dir = tempfile.mkdtemp(prefix="bench_engine_model_")
    build_tiny_model(model_spec["family"], **{k: v for k, v in model_spec.items() if k != "family"}, seed=0,
                     save_dir=model_dir)
    cfg = {"steps": args.steps, "global_batch": args.global_batch, "micro_batch": args.micro_batch,
           "chunk_size": args.chunk_size, "keep_chunks": args.keep_chunks, "zero_stage": args.zero_stage,
           "lr": 1e-3, "seed": args.seed, "pad_id": build_tokenizer().pad_token_id,
           "row_len": max([len(s["input_ids"]) for s in samples] + [args.long_sample]), "profile": args.profile,
           "timeout": args.timeout, "model": model_spec, "model_dir": model_dir,
           "recompute_layers": args.recompute_layers, "long_sample": args.long_sample,
           "world": 2, "precision": "fp32", "optimizer": "torch.optim.AdamW", "gradient_clipping": 0.0,
           "loss": "sum(CE) / loss tokens of the global batch, for every system"}
    stats = data_stats(batches)
    print(f"data: {stats['num_samples']} samples in {args.steps} steps, {stats['tokens']} tokens, longest "
          f"{stats['max_len']}, median {stats['median_len']}; longest per step {stats['longest_per_step']}")

    rows = []
    for system in args.systems.split(","):
        t = time.perf_counter()
        rows.append(summarise(system, run_system(system, cfg, warmup, batches), batches, cfg))
        rows[-1]["load_avg_1min"] = os.getloadavg()[0]  # other jobs on the machine inflate wall times
        print(f"  {system}: {time.perf_counter() - t:.1f} s wall, load {rows[-1]['load_avg_1min']:.1f}, steps "
              f"{[round(x, 2) for x in rows[-1]['step_s']]} s", flush=True)
    for r in rows:  # same init, data and objective: every system's losses must match
        r["max_loss_diff"] = max(abs(a - b) for a, b in zip(r["losses"], rows[0]["losses"]))
    # the machine's limit in this run: the best per-core rate any system reached, on every core (rank) at once
    limit = max(r["tokens_per_core_s"] for r in rows) * 2
    for r in rows:
        r["machine_limit_ratio"] = r["tokens_per_s"] / limit
    columns = ["system", "tokens_per_s", "tokens_per_cpu_s", "tokens_per_core_s", "machine_limit_ratio",
               "dominant_step_tokens_per_s", "s_per_step", "load_rss_mib", "peak_rss_mib",
               "train_rss_mib", "gathers_per_step", "gather_mib_per_step", "imb_cpu", "imb_tokens", "imb_cost",
               "meeting_eff_model", "computed_per_real", "max_loss_diff"]
    print(table(rows, columns))
    pairs = ratios(rows)
    if pairs:
        print(table(pairs))
    breakdown = [dict(system=r["system"], **r["time_breakdown"], collectives=r["collective_s"],
                      collective_wait=r["collective_wait_s"]) for r in rows if r["time_breakdown"]]
    if breakdown:
        print("seconds per step and rank, by part (executor = forward + state_forward + recompute + backward + "
              "lockstep_pad + other; collectives: inside torch.distributed calls, within the parts, of which "
              "collective_wait waiting for the other rank)")
        print(table(breakdown))
    for r in rows:
        if r["profile"]:
            print(f"\n--- cProfile, rank 0, {r['system']} ---\n{r['profile']}")
    from ds_chunkflow.testing.models import tiny_config

    config = tiny_config(model_spec["family"], **{k: v for k, v in model_spec.items() if k != "family"})
    model = dict(model_spec, num_parameters=_count_parameters(config), attn_implementation="sdpa")
    import shutil

    shutil.rmtree(model_dir, ignore_errors=True)
    path = save_json(args.out or ("engine_quick.json" if args.quick else "engine.json"),
                     {"config": cfg, "model": model, "data": stats, "rows": rows, "ratios": pairs})
    print(f"wrote {path}")


def _count_parameters(config) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


if __name__ == "__main__":
    main()
