"""Data start-up: today's loader vs load_sft_data (datasets map + cache), cold and warm, and per-rank RSS.

    python benchmarks/bench_startup.py            # 100K chats (old loader on a 10K prefix), ~5-10 min on 2 cores
    python benchmarks/bench_startup.py --quick    # 2K chats, a smoke check (results/startup_quick.json)

Data: ``--num_chats`` generated multi-turn chats (seeded, so the same file every run; 2-4 user/assistant turns,
a system prompt in 30%, log-uniform 200-6000 tokens under the toy tokenizer), written once under
``--data_dir``. Every measurement runs in a fresh Python process (seconds from the call to a loaded
dataset; peak RSS = that process's ``ru_maxrss``; map workers are reported apart as ``children``):

* ``old``: ``load_jsonl`` as of commit b3d5a12 (read from git: one Python loop, transformers'
  ``return_assistant_tokens_mask``, samples as tensors in memory). It needs ``{% generation %}``
  markers, so every row here uses the toy tokenizer's marked ChatML template, the same for all.
  On the full run it reads the first ``--old_chats`` (10K) chats: its samples/s is the figure compared;
  its seconds for the full set are extrapolated and marked so;
* ``floor``: rendering and tokenising alone (no labels, no checks, no storage) on one process, which
  every loader must spend; ``cpus * floor / old`` samples/s is the most any loader can gain on this machine;
* ``new cold, num_proc=1``: ``load_sft_data`` in one process on the old loader's chats (the per-process cost);
* ``new cold``: ``load_sft_data`` with an empty cache (``num_proc`` default: the usable CPUs);
* ``new warm``: the same call again (the cache from the cold run);
* ``ranks``: 1 and 2 gloo ranks loading from the warm cache, each rank reading 2000 samples; per rank:
  peak RSS and anonymous (private) memory, which is what grows with the data when samples are held
  in Python; the memory-mapped Arrow pages are file-backed page cache, shared by the ranks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, save_json, table  # noqa: E402

BASELINE_COMMIT = "b3d5a12"
SEED = 11


def generate(path: Path, num_chats: int) -> None:
    """Seeded multi-turn chats, one JSON line each (words from examples/make_sample_data.py's list)."""
    sys.path.insert(0, str(REPO / "examples"))
    from make_sample_data import SYSTEM_PROMPTS, WORDS

    rng = np.random.default_rng(SEED)
    words = np.array(WORDS)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for _ in range(num_chats):
            num_tokens = float(np.exp(rng.uniform(np.log(200), np.log(6000))))
            turns = int(rng.integers(2, 5))
            messages = [{"role": "system", "content": str(rng.choice(SYSTEM_PROMPTS))}] if rng.random() < 0.3 else []
            per_turn = max(4, int(num_tokens / 2.9 / turns))  # ~2.9 toy tokens per word (measured)
            for _ in range(turns):
                n_user = max(1, int(per_turn * rng.uniform(0.1, 0.5)))
                for role, n in (("user", n_user), ("assistant", per_turn - n_user)):
                    w = words[rng.integers(0, len(words), n)]
                    w[9::10] = np.char.add(w[9::10], ".")
                    messages.append({"role": role, "content": " ".join(w).capitalize() + "."})
            f.write(json.dumps({"messages": messages}) + "\n")
    tmp.rename(path)


def _old_loader():
    """load_jsonl of BASELINE_COMMIT, imported as ds_chunkflow._data_baseline (its relative imports resolve)."""
    import ds_chunkflow  # noqa: F401

    source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:ds_chunkflow/data/jsonl.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    file = Path(tempfile.mkdtemp()) / "data_baseline.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location("ds_chunkflow._data_baseline", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.load_jsonl


def _memory() -> dict:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = lambda k: int(status[k].split()[0]) / 1024  # noqa: E731
    return {"rss_mib": kib("VmRSS"), "anon_mib": kib("RssAnon"),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def worker(kind: str, data: str, cache: str, limit: int | None) -> dict:
    """One measurement, in this (fresh) process."""
    from ds_chunkflow.testing.tokenizer import CHAT_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer(chat_template=CHAT_TEMPLATE)
    if kind == "floor":  # render + encode only, one process: what any loader must spend per sample
        with open(data) as f:
            chats = [json.loads(line)["messages"] for _, line in zip(range(limit), f)]
        backend = tokenizer.backend_tokenizer
        start = time.perf_counter()
        tokens = sum(len(backend.encode(tokenizer.apply_chat_template(m, tokenize=False), add_special_tokens=False))
                     for m in chats)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "samples": len(chats), "tokens": tokens, "samples_per_s": len(chats) / seconds}
    if limit:
        sub = Path(cache) / f"first_{limit}.jsonl"
        sub.parent.mkdir(parents=True, exist_ok=True)
        with open(data) as src, open(sub, "w") as dst:
            dst.writelines(line for _, line in zip(range(limit), src))
        data = str(sub)
    if kind == "old":
        load_jsonl = _old_loader()
        start = time.perf_counter()
        ds = load_jsonl(data, tokenizer)
    else:
        from ds_chunkflow.data.hf_data import load_sft_data

        start = time.perf_counter()
        ds = load_sft_data(data, tokenizer, cache_dir=cache, num_proc=1 if kind == "new1" else None)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples": len(ds), "tokens": ds.stats.num_tokens,
            "samples_per_s": len(ds) / seconds, **_memory()}


def rank_worker(rank: int, world: int, data: str, cache: str, out: str) -> None:
    import torch.distributed as dist

    from ds_chunkflow.data.hf_data import load_sft_data
    from ds_chunkflow.testing.tokenizer import CHAT_TEMPLATE, build_tokenizer

    dist.init_process_group("gloo", rank=rank, world_size=world)
    start = time.perf_counter()
    ds = load_sft_data(data, build_tokenizer(chat_template=CHAT_TEMPLATE), cache_dir=cache)
    seconds = time.perf_counter() - start
    after_load = _memory()
    for i in np.random.default_rng(rank).integers(0, len(ds), 2000):
        ds[int(i)]
    Path(f"{out}.{rank}").write_text(json.dumps({"rank": rank, "world": world, "seconds": seconds,
                                                 "anon_after_load_mib": after_load["anon_mib"], **_memory()}))


def run_worker(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--num_chats", type=int, default=None)
    p.add_argument("--old_chats", type=int, default=10_000, help="the old loader reads this many (full run)")
    p.add_argument("--data_dir", default=str(REPO / "outputs" / "bench_startup"))
    p.add_argument("--worker", nargs=4, metavar=("KIND", "DATA", "CACHE", "LIMIT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, data, cache, limit = args.worker
        print(json.dumps(worker(kind, data, cache, int(limit) or None)))
        return
    n = args.num_chats or (2000 if args.quick else 100_000)
    old_n = n if args.quick else min(args.old_chats, n)
    root = Path(args.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"chats_{n}_seed{SEED}.jsonl"
    if not data.exists():
        t = time.perf_counter()
        generate(data, n)
        print(f"generated {data} ({data.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s")
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=root))

    rows = []
    load_before = os.getloadavg()
    old = run_worker("old", str(data), str(cache / "old"), str(old_n if old_n < n else 0))
    rows.append({"loader": f"old (b3d5a12 load_jsonl), {old_n} chats", **old})
    if old_n < n:
        rows.append({"loader": f"old, {n} chats (extrapolated from its samples/s)", "samples": n,
                     "seconds": n / old["samples_per_s"], "samples_per_s": old["samples_per_s"], "extrapolated": True})
    floor = run_worker("floor", str(data), str(cache / "floor"), str(min(old_n, 5000)))
    rows.append({"loader": f"render + tokenise only (the floor), {floor['samples']} chats, 1 process", **floor})
    one = run_worker("new1", str(data), str(cache / "new1"), str(old_n if old_n < n else 0))
    rows.append({"loader": f"new load_sft_data, cold, num_proc=1, {one['samples']} chats", **one})
    cold = run_worker("new", str(data), str(cache / "new"), "0")
    rows.append({"loader": f"new load_sft_data, cold cache, {n} chats", **cold})
    warm = run_worker("new", str(data), str(cache / "new"), "0")
    rows.append({"loader": f"new load_sft_data, warm cache, {n} chats", **warm})

    from ds_chunkflow.testing.spawn import run_ranks

    ranks = []
    for world in (1, 2):
        out = cache / f"ranks{world}"
        run_ranks(rank_worker, str(data), str(cache / "new"), str(out), world=world, timeout=600)
        ranks += [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]

    speedup = cold["samples_per_s"] / old["samples_per_s"]
    anon = {w: max(r["anon_mib"] for r in ranks if r["world"] == w) for w in (1, 2)}
    cpus = len(os.sched_getaffinity(0))
    goals = {"cold_speedup_vs_old": speedup, "cpus": cpus,
             "one_process_speedup_vs_old": one["samples_per_s"] / old["samples_per_s"],
             "one_process_fraction_of_floor": one["samples_per_s"] / floor["samples_per_s"],
             "cold_speedup_ceiling": cpus * floor["samples_per_s"] / old["samples_per_s"], "cold_speedup_goal": 5.0, "warm_seconds": warm["seconds"],
             "warm_goal_s": 10.0, "per_rank_anon_mib_1_rank": anon[1], "per_rank_anon_mib_2_ranks": anon[2]}
    print(table(rows, ["loader", "samples", "seconds", "samples_per_s", "peak_rss_mib", "children_peak_rss_mib"]))
    print()
    print(table(ranks, ["world", "rank", "seconds", "anon_after_load_mib", "anon_mib", "rss_mib", "peak_rss_mib"]))
    print()
    print(f"cold speedup {speedup:.1f}x (goal 5x; ceiling on {cpus} CPUs when tokenising alone is the whole cost: "
          f"{goals['cold_speedup_ceiling']:.1f}x), warm {warm['seconds']:.2f} s (goal < 10 s), per-rank private "
          f"memory {anon[1]:.0f} MiB on 1 rank, {anon[2]:.0f} MiB on 2 ranks")
    path = save_json("startup_quick.json" if args.quick else "startup.json", {
        "data": {"file": str(data.relative_to(REPO)) if data.is_relative_to(REPO) else str(data), "chats": n,
                 "tokens": cold["tokens"], "bytes": data.stat().st_size, "seed": SEED},
        "note": (f"old loader measured on the first {old_n} chats; its full-set seconds are extrapolated from its "
                 "samples/s" if old_n < n else "all loaders on the same chats"),
        "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        "contention": "the machine's 2 cores are shared with other jobs: a load average above 2 means the loaders "
                      "got less than 2 cores, and the cold figures (old and new alike) vary by ~30% between runs",
        "loaders": rows, "ranks": ranks, "goals": goals})
    print(f"saved {path}")
    shutil.rmtree(cache, ignore_errors=True)  # ~1.3 GB of Arrow files per 100K run; the data file is kept


if __name__ == "__main__":
    main()
