"""The longest single sample that trains one step within a per-rank memory budget, 2 ranks.

    OMP_NUM_THREADS=1 python benchmarks/bench_longest.py                       # budgets 1 and 2 GiB
    OMP_NUM_THREADS=1 python benchmarks/bench_longest.py --budgets_gib 0.125,0.25 --trial_timeout 240

Same tiny random Qwen2 as ``bench_peers.py`` (``bench_engine.MODEL``, untied, saved once and loaded
by every system), ZeRO-2, fp32, AdamW, 2 gloo ranks. A trial at length L: fresh 2-rank processes,
one warm-up step on a 256-token sample, then one step on ``bench_engine.long_sample(L)`` (the global
batch is that one sample); a trial past ``--trial_timeout`` is killed (SIGKILL via
``run_ranks``) and counts as not fitting. Memory: per rank, ``ru_maxrss`` at the end minus the RSS
after start-up (model loaded, engine / trainer built, before any step), max over ranks. A trial
fits a budget when it trains and that rise is <= the budget. Systems:

* ``chunkflow``       ChunkFlow, ``--chunk_size``, keep_chunks 1 (one rank trains the sample);
* ``chunkflow_sp``    the same with ``sequence_parallel.max_size: 2`` (the sample over both ranks) and
                      ``longer_chunks: false`` (memory first: each rank computes chunk_size / 2 rows per
                      call; the engine's default, true, computes chunk_size rows per call, for speed:
                      ``--sp_longer_chunks``);
* ``alst``            DeepSpeed ALST, SP 2 (``peer_alst.py``: Ulysses, TiledMLP, checkpointing, tiled loss);
* ``trl_gc``          TRL ``SFTTrainer(padding_free=True)`` with its default gradient checkpointing
                      (accelerate repeats the one-sample dataset on the second rank);
* ``deepspeed_gc``    plain ``deepspeed.initialize``, HF gradient checkpointing (bench_engine's ``packed``).

K/V state offload (``offload.kv_state_min_tokens``) moves the state to the host of a GPU run; on a
CPU run the host *is* the device, so it does not change the peak and is not a separate row here.

Search per system: start at ``--start``, double while it fits (or until the system's share of
``--search_cap``), then bisect between the last fit and the first miss (``--bisect`` steps, to a
multiple of 256); trials are shared by the budgets. A miss by time (the trial cap) is reported as
such and not bisected. ChunkFlow's column ``pred_mib``: ``autotune.predict`` (the autotuner's
public prediction, profile measured by ``autotune.measure_profile`` in a separate 2-rank run) at the
longest fitting length, minus the parameters term (start-up holds them); ``pred_longest``: the
longest length whose prediction (no margin) stays within the budget. ``kib_per_token`` /
``extrap_longest``: a line ``rise = a + b L`` through the system's trials that trained (least squares)
and the length where it meets the budget: an extrapolation, for budgets the trial cap keeps out of
reach on CPU (attention time grows as L^2, memory as L). Writes benchmarks/results/longest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from _common import RESULTS, save_json, table  # noqa: E402
from bench_engine import MODEL, long_sample  # noqa: E402

SYSTEMS = ("chunkflow", "chunkflow_sp", "alst", "trl_gc", "deepspeed_gc")
ENGINE_SYSTEM = {"chunkflow": "chunkflow", "chunkflow_sp": "chunkflow_sp", "deepspeed_gc": "packed"}
WARMUP_TOKENS = 256
GRAIN = 256
MIB = 2**20


# ----------------------------------------------------------------------------- one trial
def run_trial(system: str, length: int, cfg: dict) -> dict:
    """One warm-up + one step at ``length`` in fresh ranks; peak RSS rise over start-up (max over ranks)."""
    from ds_chunkflow.testing.spawn import run_ranks

    sample, warmup = long_sample(length, seed=0), [long_sample(WARMUP_TOKENS, seed=1)]
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, system)
        try:
            if system == "alst":
                from peer_alst import alst_worker

                run_ranks(alst_worker, cfg, warmup, [[sample]], prefix, timeout=cfg["trial_timeout"])
            elif system == "trl_gc":
                from bench_peers import hf_worker

                hf_cfg = dict(cfg, out_dir=tmp, max_len=length, trl_no_checkpointing=False,
                              trl_padding_free={"micro_batch": 1, "grad_accum": 1, "sampling": "sequential"})
                run_ranks(hf_worker, "trl_padding_free", hf_cfg, [sample], prefix, timeout=cfg["trial_timeout"])
            else:
                from bench_engine import worker

                run_ranks(worker, ENGINE_SYSTEM[system], dict(cfg, row_len=length), warmup, [[sample]], prefix,
                          timeout=cfg["trial_timeout"])
            ranks = [json.loads(Path(f"{prefix}.{r}").read_text()) for r in range(2)]
        except RuntimeError as e:
            wall = time.perf_counter() - t
            timed_out = wall >= cfg["trial_timeout"]
            reason = f"time cap {cfg['trial_timeout']:.0f} s" if timed_out else str(e).strip().splitlines()[-1][:200]
            return {"length": length, "ok": False, "reason": reason, "timed_out": timed_out, "wall_s": wall}
    return {"length": length, "ok": True, "reason": "", "timed_out": False, "wall_s": time.perf_counter() - t,
            "rise_mib": max(r["peak_rss"] - r["rss_after_init"] for r in ranks) / MIB,
            "peak_rss_mib": max(r["peak_rss"] for r in ranks) / MIB,
            "startup_rss_mib": max(r["rss_after_init"] for r in ranks) / MIB}


# ----------------------------------------------------------------------------- the autotuner's prediction
def profile_worker(rank, world, cfg, out):
    """ChunkFlow's engine as the trials build it; the autotuner's static terms and measured profile."""
    import dataclasses

    from bench_engine import _engine

    from ds_chunkflow.deepspeed import autotune
    from ds_chunkflow.deepspeed.distributed import all_reduce

    engine, _ = _engine("chunkflow", cfg)
    static = autotune.static_terms(list(engine.module.parameters()), engine.zero_optimization_stage(),
                                   engine.dp_world_size, getattr(engine, "basic_optimizer", None), False)
    reduce_max = lambda xs: all_reduce(xs, "max", engine.data_parallel_group, engine.device)  # noqa: E731
    profile = autotune.measure_profile(engine, engine.module, engine.device, engine.chunkflow_config, static,
                                       reduce_max)
    if rank == 0:
        Path(out).write_text(json.dumps(dataclasses.asdict(profile)))


def measure_profile(cfg):
    from ds_chunkflow.deepspeed.autotune import MemoryProfile
    from ds_chunkflow.testing.spawn import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(profile_worker, cfg, os.path.join(tmp, "p.json"), timeout=600)
        d = json.loads(Path(tmp, "p.json").read_text())
    for k in ("act_coeffs", "backward_coeffs"):
        d[k] = tuple(d[k]) if d[k] is not None else None
    return MemoryProfile(**d)


def predicted_rise(profile, length: int, chunk_size: int) -> int:
    """``autotune.predict`` for K = 1 at ``length``, minus the parameters (already in the start-up RSS)."""
    from ds_chunkflow.deepspeed.autotune import Workload, predict

    p = predict(profile, Workload(length), chunk_size, 1)
    return p.total - p.terms.get("parameters", 0)


def predicted_longest(profile, budget_bytes: int, chunk_size: int) -> int:
    lo, hi = 0, 1 << 26
    while hi - lo > GRAIN:
        mid = (lo + hi) // 2 // GRAIN * GRAIN
        lo, hi = (mid, hi) if predicted_rise(profile, mid, chunk_size) <= budget_bytes else (lo, mid)
    return lo


def line_fit(trials: list[dict]) -> tuple[float, float] | None:
    """(a MiB, b MiB per token) of rise = a + b L over the trials that trained; None with fewer than 2."""
    pts = [(t["length"], t["rise_mib"]) for t in trials if t["ok"]]
    if len({x for x, _ in pts}) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return my - b * mx, b


# ----------------------------------------------------------------------------- the search
def search(system: str, budgets_gib: list[float], cfg: dict, deadline: float, log,
           known: list[dict] = ()) -> tuple[list[dict], list[dict]]:
    """Doubling then bisection per budget (smallest first), sharing trials (``known``: an earlier run's, reused);
    returns (results, trials)."""
    trials: dict[int, dict] = {t["length"]: t for t in known}

    def trial(n: int) -> dict:
        if n not in trials:
            trials[n] = run_trial(system, n, cfg)
            t = trials[n]
            log(f"  {system} L={n}: " + (f"rise {t['rise_mib']:.0f} MiB" if t["ok"] else f"failed ({t['reason']})")
                + f", {t['wall_s']:.0f} s")
        return trials[n]

    results = []
    for b in sorted(budgets_gib):
        fits = lambda t: t["ok"] and t["rise_mib"] <= b * 1024  # noqa: E731, B023
        lo = max((n for n, t in trials.items() if fits(t)), default=None)
        misses = [n for n, t in trials.items() if not fits(t) and n > (lo or 0)]
        hi = min(misses, default=None)
        capped = ""
        while hi is None and not capped:  # doubling (the first trial runs even past the deadline)
            if trials and time.perf_counter() > deadline:
                capped = "search cap"
                break
            n = 2 * lo if lo else cfg["start"]
            (lo, hi) = (n, hi) if fits(trial(n)) else (lo, n)
        if hi is not None and not trials[hi]["timed_out"]:
            for _ in range(cfg["bisect"]):  # bisection (memory misses only)
                mid = ((lo or 0) + hi) // 2 // GRAIN * GRAIN
                if mid <= (lo or 0) or time.perf_counter() > deadline:
                    capped = capped or ("search cap" if time.perf_counter() > deadline else "")
                    break
                if trial(mid)["timed_out"]:
                    hi = mid
                    break
                (lo, hi) = (mid, hi) if fits(trials[mid]) else (lo, mid)
        miss = trials.get(hi) if hi is not None else None
        limited = ("memory" if miss and miss["ok"] else miss["reason"] if miss else capped or "?")
        results.append({"system": system, "budget_gib": b, "longest": lo or 0,
                        "rise_mib": trials[lo]["rise_mib"] if lo else None, "first_miss": hi,
                        "miss_rise_mib": miss.get("rise_mib") if miss else None, "limited_by": limited,
                        "capped": capped})
    return results, sorted(trials.values(), key=lambda t: t["length"])


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--budgets_gib", default="1,2", help="per-rank peak RSS rise over start-up, GiB, comma-separated")
    p.add_argument("--start", type=int, default=4096, help="first length tried")
    p.add_argument("--bisect", type=int, default=3, help="bisection steps after the doubling")
    p.add_argument("--chunk_size", type=int, default=1024, help="ChunkFlow's chunk size (bench_engine's default)")
    p.add_argument("--trial_timeout", type=float, default=300, help="seconds per trial (killed past it)")
    p.add_argument("--search_cap", type=float, default=900, help="seconds for the whole search (split per system)")
    p.add_argument("--out", default="longest.json", help="JSON name in benchmarks/results")
    p.add_argument("--append", action="store_true", help="keep --out's rows of other systems / budgets and reuse its "
                   "trials (e.g. a finer bisection at one budget: only the new lengths run)")
    p.add_argument("--sp_longer_chunks", action="store_true", help="chunkflow_sp with sequence_parallel.longer_chunks "
                   "true (the engine's default: chunk_size rows per rank per call) instead of false")
    args = p.parse_args()
    if args.start % GRAIN:
        p.error(f"--start must be a multiple of {GRAIN}")
    return args


def main():
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import shutil

    from ds_chunkflow.testing.models import build_tiny_model
    from ds_chunkflow.testing.tokenizer import build_tokenizer

    systems, budgets = args.systems.split(","), [float(b) for b in args.budgets_gib.split(",")]
    model_dir = tempfile.mkdtemp(prefix="bench_longest_model_")
    spec = dict(MODEL, tie_word_embeddings=False)
    build_tiny_model(spec["family"], **{k: v for k, v in spec.items() if k != "family"}, seed=0, save_dir=model_dir)
    cfg = {"model_dir": model_dir, "model": spec, "zero_stage": 2, "lr": 1e-3, "seed": 0, "keep_chunks": 1,
           "chunk_size": args.chunk_size, "pad_id": build_tokenizer().pad_token_id, "recompute_layers": "none",
           "profile": False, "micro_batch": 1, "trial_timeout": args.trial_timeout, "timeout": args.trial_timeout,
           "start": args.start, "bisect": args.bisect, "sp_longer_chunks": args.sp_longer_chunks}
    started = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - started:6.0f} s] {s}", flush=True)  # noqa: E731
    profile = None
    if "chunkflow" in systems:
        profile = measure_profile(cfg)
        log("autotune profile measured")
    rows, all_trials, earlier = [], {}, {}
    if args.append and (RESULTS / args.out).exists():
        earlier = json.loads((RESULTS / args.out).read_text())
        rows = [r for r in earlier["rows"] if r["system"] not in systems or r["budget_gib"] not in budgets]
        all_trials = dict(earlier["trials"])
    for i, system in enumerate(systems):
        share = (args.search_cap - (time.perf_counter() - started)) / (len(systems) - i)
        res, all_trials[system] = search(system, budgets, cfg, time.perf_counter() + share, log,
                                         all_trials.get(system, []))
        for r in res:
            if system == "chunkflow" and profile is not None:
                r["pred_mib"] = predicted_rise(profile, r["longest"], args.chunk_size) / MIB if r["longest"] else None
                r["pred_longest"] = predicted_longest(profile, int(r["budget_gib"] * 2**30), args.chunk_size)
        rows += res
        save_json(args.out, {"config": cfg, "args": vars(args), "rows": rows, "trials": all_trials,
                             "complete": False, "elapsed_s": time.perf_counter() - started})
    rows.sort(key=lambda r: (SYSTEMS.index(r["system"]) if r["system"] in SYSTEMS else 99, r["budget_gib"]))
    for r in rows:
        fit = line_fit(all_trials[r["system"]])
        r["kib_per_token"] = fit[1] * 1024 if fit else None
        r["extrap_longest"] = int((r["budget_gib"] * 1024 - fit[0]) / fit[1]) if fit and fit[1] > 0 else None
    alst = {r["budget_gib"]: r["longest"] for r in rows if r["system"] == "alst"}
    for r in rows:
        r["vs_alst"] = r["longest"] / alst[r["budget_gib"]] if alst.get(r["budget_gib"]) else None
    extrap = {r["budget_gib"]: r["extrap_longest"] for r in rows if r["system"] == "alst"}
    for r in rows:
        r["extrap_vs_alst"] = r["extrap_longest"] / extrap[r["budget_gib"]] if extrap.get(r["budget_gib"]) else None
    print(table(rows, ["system", "budget_gib", "longest", "rise_mib", "pred_mib", "pred_longest", "vs_alst",
                       "first_miss", "miss_rise_mib", "limited_by", "capped", "kib_per_token", "extrap_longest",
                       "extrap_vs_alst"]))
    shutil.rmtree(model_dir, ignore_errors=True)
    runs = earlier.get("runs", [{k: earlier.get(k) for k in ("args", "elapsed_s", "environment")}] if earlier else [])
    runs.append({"args": vars(args), "elapsed_s": time.perf_counter() - started, "load_avg_1min": os.getloadavg()[0]})
    path = save_json(args.out, {"config": cfg, "args": vars(args), "rows": rows, "trials": all_trials,
                                "complete": True, "elapsed_s": time.perf_counter() - started,
                                "load_avg_1min": os.getloadavg()[0], "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
