"""A/B of one bench_engine system between a base commit and this checkout, runs interleaved.

The machine's speed drifts by more than the effects worth measuring here (the per-core rate of the
same code moved 1,890-2,180 tokens per CPU-second within minutes on the 2-core CI machine), so one
run of each side says little. This runs ``bench_engine.py --systems SYSTEM`` alternately in a git
worktree of ``--base`` and in this checkout, ``--runs`` times each, and compares what drift cancels
least into: ``self_eff``, the system's tokens/s over 2 x its own per-core rate in the same run (the
share of each rank's wall time spent on its own work; 1 - self_eff is waiting), per run and as a
mean per side::

    python benchmarks/bench_ab.py --base 95e21dd --system chunkflow_sp_k4 --runs 3

Writes benchmarks/results/ab_<system>.json (``--out``): every run's row (bench_engine's columns), the
per-side means, and the two commits.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE)]
from _common import save_json, table  # noqa: E402

KEEP = ("tokens_per_s", "tokens_per_core_s", "imb_cpu", "meeting_eff_model", "step_s", "cpu_s")


def run_once(checkout: Path, system: str, out: str) -> dict:
    subprocess.run([sys.executable, "benchmarks/bench_engine.py", "--systems", system, "--out", out],
                   cwd=checkout, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    path = checkout / "benchmarks" / "results" / out
    row = json.loads(path.read_text())["rows"][0]
    path.unlink()
    row = {k: row.get(k) for k in KEEP}
    row["self_eff"] = row["tokens_per_s"] / (2 * row["tokens_per_core_s"])
    row["heavy_step_eff"] = [sum(c) / 2 / w for w, c in zip(row["step_s"], row["cpu_s"])][-2:]
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="commit to compare against (checked out in a temporary worktree)")
    p.add_argument("--system", default="chunkflow_sp_k4")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(base_dir), args.base], cwd=REPO, check=True)
        try:
            rows = []
            for i in range(args.runs):
                for side, checkout in (("base", base_dir), ("head", REPO)):
                    row = run_once(checkout, args.system, f"_ab_{side}.json")
                    rows.append({"side": side, "run": i, **row})
                    print(f"  {side} run {i}: self_eff {row['self_eff']:.3f}, {row['tokens_per_s']:.0f} tokens/s",
                          flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_dir)], cwd=REPO, check=False)
    means = []
    for side, commit in (("base", args.base), ("head", head)):
        mine = [r for r in rows if r["side"] == side]
        means.append({"side": side, "commit": commit, "runs": len(mine),
                      **{k: sum(r[k] for r in mine) / len(mine) for k in ("self_eff", "tokens_per_s",
                                                                          "tokens_per_core_s", "imb_cpu")}})
    print(table(rows, ["side", "run", "self_eff", "tokens_per_s", "tokens_per_core_s", "imb_cpu"]))
    print(table(means))
    path = save_json(args.out or f"ab_{args.system}.json",
                     {"system": args.system, "base": args.base, "head": head, "rows": rows, "means": means,
                      "delta_self_eff": means[1]["self_eff"] - means[0]["self_eff"]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
