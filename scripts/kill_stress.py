"""Kill-and-resume stress test of the example's checkpoints (bounded: stops by itself).

    python scripts/kill_stress.py --budget 180 --steps 8 --seed 0

1. One uninterrupted run of the SFT recipe (ds_chunkflow.sft) (2 CPU ranks, ``--save_every 1``): the reference losses,
   read exactly from DeepSpeed's csv monitor (one row per step, Python's float repr).
2. While the budget lasts: a run in a fresh directory, its whole process group SIGKILLed at a random
   (seeded) moment: a random delay (0 to 1.2 median steps) after its k-th logged loss, k random in
   1..steps-1, so kills land in steps, in saves and between them; then ``--resume`` in the same
   directory (``--resume auto`` if the kill came
   before any checkpoint was complete, which must then say it starts fresh). A resume succeeds if it
   exits 0 with a complete final checkpoint at ``--steps``; it continues bitwise if every step it
   trained has the reference loss, the final one included.
   ``--keep_checkpoints N``: the recipe's retention (ds_chunkflow.deepspeed.retention) runs after every save, so
   kills also land in its deletions; a resume must then also leave at most N complete tags and no
   half-deleted leftovers (``.ds_chunkflow_deleting.*``).

Prints a table and writes benchmarks/results/kill_stress.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ds_chunkflow.deepspeed.checkpoint import MANIFEST, TRASH_PREFIX, check_tag, find_complete_tag  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(src: Path, out_dir: Path) -> Path:
    config = yaml.safe_load(src.read_text())
    config["csv_monitor"] = {"enabled": True, "output_path": str(out_dir / "csv"), "job_name": "sft"}
    config["wandb"] = {"enabled": False}
    path = out_dir / "ds_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def command(args, out_dir: Path, config: Path, model: Path | None, resume: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "ds_chunkflow.sft", "--deepspeed_config", str(config), "--steps", str(args.steps),
           "--save_every", "1", "--no_export", "--output_dir", str(out_dir)]
    if model is not None:
        cmd += ["--model", str(model)]
    if args.keep_checkpoints:
        cmd += ["--keep_checkpoints", str(args.keep_checkpoints)]
    if resume == "required":
        cmd += ["--resume"]
    elif resume:
        cmd += ["--resume", resume]
    return cmd


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "DS_CHUNKFLOW_SKIP_SHM_BUILD": "1",
       "PYTHONUNBUFFERED": "1"}


def run(cmd, log: Path, timeout: float, kill: tuple[Path, int, float] | None = None, watch: Path | None = None) -> dict:
    """Runs ``cmd`` in its own process group, watching the losses ``watch`` (a run directory) logs.
    ``kill=(k, delay)``: SIGKILLs the whole group ``delay`` s after the k-th loss was logged (so the kill
    lands in the save of step k, in step k+1 or in its save)."""
    start = time.perf_counter()
    killed = False
    with open(log, "ab") as out:
        p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        kill_time, logged, stamps = None, 0, []
        while p.poll() is None and time.perf_counter() - start < timeout:
            if watch is not None:
                now = sum(len(v) for v in losses(watch).values())
                if now > logged:
                    logged, stamps = now, stamps + [time.perf_counter()]
            if kill is not None and kill_time is None and logged >= kill[0]:
                kill_time = time.perf_counter() + kill[1]
            if kill_time is not None and time.perf_counter() >= kill_time:
                break
            time.sleep(0.02)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            killed = True
        _reap_group(p.pid)
    return {"rc": p.returncode, "killed": killed, "seconds": time.perf_counter() - start,
            "timed_out": killed and kill_time is None, "step_times": [b - a for a, b in zip(stamps, stamps[1:])]}


def _reap_group(pgid: int) -> None:
    """Makes sure nothing of the run's process group survives (the ranks are the launcher's children)."""
    for _ in range(50):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.1)


def losses(out_dir: Path) -> dict[int, list[str]]:
    """Every loss the csv monitor logged, per step (global samples), in the order written (repr strings)."""
    rows: dict[int, list[str]] = {}
    # one folder per run: the job name gets the run's start time appended (sft-YYYYmmdd-HHMMSS), so sorted
    for path in sorted((out_dir / "csv").glob("sft*/Train_chunkflow_loss.csv")):
        with open(path) as f:
            for row in csv.reader(f):
                if len(row) == 2 and row[0] != "step":
                    rows.setdefault(int(row[0]), []).append(row[1])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=180.0, help="seconds in all (the last resume may run over)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="ds_configs/sft_zero3.yaml")
    ap.add_argument("--out", default="benchmarks/results/kill_stress.json")
    ap.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    ap.add_argument("--keep_checkpoints", type=int, default=0, help="the recipe's retention (0: keep every tag)")
    args = ap.parse_args()
    deadline = time.perf_counter() + args.budget
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="kill_stress_"))
    try:
        ref_dir = tmp / "reference"
        ref_dir.mkdir()
        ref = run(command(args, ref_dir, write_config(ROOT / args.config, ref_dir), None, None), tmp / "reference.log",
                  timeout=max(60.0, args.budget), watch=ref_dir)
        ref_losses = {s: v[-1] for s, v in losses(ref_dir).items()}
        if ref["rc"] != 0 or len(ref_losses) != args.steps:
            print((tmp / "reference.log").read_text()[-4000:])
            raise SystemExit(f"reference run failed: rc {ref['rc']}, {len(ref_losses)} losses of {args.steps}")
        T = ref["seconds"]
        times = sorted(ref["step_times"]) or [1.0]
        step_s = times[len(times) // 2]  # median step + save, as the reference logged them
        model = ref_dir / "tiny-qwen2"
        print(f"reference: {args.steps} steps in {T:.1f} s, final loss {ref_losses[max(ref_losses)]}", flush=True)
        trials = []
        while time.perf_counter() + 2.2 * T < deadline:
            i = len(trials)
            d = tmp / f"kill{i}"
            d.mkdir()
            config = write_config(ROOT / args.config, d)
            k, delay = rng.randrange(1, args.steps), rng.uniform(0.0, 1.2 * step_s)
            log = d / "run.log"
            first = run(command(args, d, config, model, None), log, timeout=3 * T, kill=(k, delay), watch=d)
            found = find_complete_tag(d)
            trial = {"kill_after_loss": k, "kill_delay_s": round(delay, 2), "killed": first["killed"],
                     "first_rc": first["rc"],
                     "tag_at_kill": found.tag, "skipped_at_kill": found.skipped,
                     "incomplete_tags_at_kill": sorted(n.name for n in d.glob("global_step*")
                                                       if not (n / MANIFEST).exists()),
                     "being_deleted_at_kill": sorted(n.name for n in d.glob(TRASH_PREFIX + "*"))}
            logged_before = losses(d)
            mode = "required" if found.tag is not None else "auto"
            second = run(command(args, d, config, model, mode), log, timeout=3 * T)
            text = log.read_text(errors="replace")
            final = find_complete_tag(d)
            after = losses(d)
            # the resumed run's rows are the last ones logged for each step it trained
            resumed_steps = [s for s in after if len(after[s]) > len(logged_before.get(s, []))]
            final_step = max(after) if after else None
            # a kill after the final save leaves nothing to train: the resume must then only load and stop
            continued = all(after[s][-1] == ref_losses.get(s) for s in resumed_steps) and (
                bool(resumed_steps) or found.step == args.steps)
            trial.update({
                "resume_mode": mode, "resume_rc": second["rc"], "resume_seconds": round(second["seconds"], 1),
                "resume_line": next((ln for ln in text.splitlines() if "resumed from" in ln or "starting fresh" in ln),
                                    None),
                "final_tag": final.tag, "final_step": final.step,
                "succeeded": second["rc"] == 0 and final.step == args.steps,
                "resumed_steps": len(resumed_steps),
                "final_loss": after[final_step][-1] if after else None,
                "reference_final_loss": ref_losses[max(ref_losses)],
                "bitwise": continued and final_step == max(ref_losses),
                "complete_tags_at_end": sum(check_tag(d, n.name)[0] is not None for n in d.iterdir() if n.is_dir()),
                "being_deleted_at_end": sorted(n.name for n in d.glob(TRASH_PREFIX + "*")),
            })
            if args.keep_checkpoints and (trial["complete_tags_at_end"] > args.keep_checkpoints
                                          or trial["being_deleted_at_end"]):
                trial["succeeded"] = False  # retention must have caught up after the resume
            if mode == "auto" and trial["resume_line"] is None:
                trial["succeeded"] = False  # --resume auto must say it starts fresh
            trials.append(trial)
            print(f"kill {i}: {delay:.2f} s after loss {k} (killed={first['killed']}), checkpoint {found.tag}, resume "
                  f"{mode}: rc {second['rc']}, final {final.tag}, bitwise {trial['bitwise']}", flush=True)
        kills = [t for t in trials if t["killed"]]
        summary = {
            "command": " ".join(sys.argv), "steps": args.steps, "seed": args.seed, "budget_s": args.budget,
            "config": args.config, "reference_seconds": round(T, 1), "median_step_s": round(step_s, 2),
            "kill_jitter_s": round(1.2 * step_s, 2),
            "kills_tried": len(kills),
            "killed_before_any_checkpoint": sum(t["tag_at_kill"] is None for t in kills),
            "killed_after_the_final_save": sum(t["resumed_steps"] == 0 for t in kills),
            "killed_with_an_incomplete_newer_tag": sum(bool(t["incomplete_tags_at_kill"]) for t in kills),
            "keep_checkpoints": args.keep_checkpoints,
            "killed_during_a_deletion": sum(bool(t["being_deleted_at_kill"]) for t in kills),
            "resumes_succeeded": sum(t["succeeded"] for t in kills),
            "resumes_bitwise": sum(t["bitwise"] for t in kills),
            "runs_that_finished_before_the_kill": len(trials) - len(kills),
            "trials": trials,
        }
        print(f"\n{'kills tried':>12} {'resumes ok':>11} {'bitwise':>8} {'before 1st ckpt':>16} "
              f"{'mid-save':>9} {'after last save':>16}")
        print(f"{summary['kills_tried']:>12} {summary['resumes_succeeded']:>11} {summary['resumes_bitwise']:>8} "
              f"{summary['killed_before_any_checkpoint']:>16} {summary['killed_with_an_incomplete_newer_tag']:>9} "
              f"{summary['killed_after_the_final_save']:>16}")
        out = ROOT / args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1))
        print(f"written: {out}")
        ok = summary["resumes_succeeded"] == summary["resumes_bitwise"] == len(kills)
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"run directories kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
