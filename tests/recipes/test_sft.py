"""The SFT recipe (ds_chunkflow.sft) as users start it (launch/sft_cpu.sh): runs that do not collide, an output dir that is
not silently reused, monitor files per run under --output_dir with optimizer steps as the step column."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_chunkflow.deepspeed.checkpoint import checkpoint_entries

ROOT = Path(__file__).resolve().parents[2]
RECIPE = [sys.executable, "-m", "ds_chunkflow.sft"]


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # the launcher (deepspeed) and python of this venv
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT),
                PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))


def _example_functions() -> dict:
    from ds_chunkflow.recipes import sft

    return vars(sft)


def _csv_steps(path: Path) -> list[int]:
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == "step", rows[:2]
    return [int(r[0]) for r in rows[1:]]


def test_checkpoint_detection_and_monitor_paths(tmp_path: Path) -> None:
    """checkpoint_entries (what the example refuses to train over) finds a `latest` file and tag dirs (not the
    tiny model, not monitor dirs);
    set_monitor_paths puts csv/tensorboard under output_dir with the run id in the job name."""
    fns = _example_functions()
    out = tmp_path / "run"
    assert checkpoint_entries(str(out)) == []  # missing dir
    (out / "tiny-qwen2").mkdir(parents=True)
    (out / "csv_monitor" / "sft-1").mkdir(parents=True)
    assert checkpoint_entries(str(out)) == []
    (out / "global_step2").mkdir()
    (out / "mytag").mkdir()
    (out / "mytag" / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert checkpoint_entries(str(out)) == ["global_step2", "mytag"]
    (out / "latest").write_text("global_step2")
    assert checkpoint_entries(str(out)) == ["latest", "global_step2", "mytag"]

    config = {"csv_monitor": {"enabled": True, "job_name": "sft"}, "tensorboard": {"enabled": True},
              "wandb": {"enabled": True}}
    fns["set_monitor_paths"](config, str(out), run_id="R1")
    assert config["csv_monitor"] == {"enabled": True, "job_name": "sft-R1", "output_path": str(out / "csv_monitor")}
    assert config["tensorboard"] == {"enabled": True, "job_name": "sft-R1", "output_path": str(out / "tensorboard")}
    kept = {"csv_monitor": {"enabled": True, "output_path": "/elsewhere", "job_name": "x"}}
    fns["set_monitor_paths"](kept, str(out), run_id="R2")
    assert kept["csv_monitor"] == {"enabled": True, "output_path": "/elsewhere", "job_name": "x-R2"}


def test_output_dir_with_checkpoints_is_refused_without_resume_or_overwrite(tmp_path: Path) -> None:
    """The example stops before building anything, naming the directory; --overwrite / --resume get past it."""
    out = tmp_path / "run"
    (out / "global_step2").mkdir(parents=True)
    (out / "latest").write_text("global_step2")
    base = [*RECIPE, "--steps", "3", "--output_dir", str(out)]
    proc = subprocess.run(base, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"--output_dir {out} holds another run's checkpoints (latest, global_step2)" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "tiny-qwen2").exists()
    # past the check, the run stops at the next thing that is wrong here: the model path
    proc = subprocess.run(base + ["--overwrite", "--model", str(tmp_path / "no-such-model")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "holds another run's checkpoints" not in proc.stderr
    assert "no-such-model" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.distributed
def test_two_runs_started_together_do_not_collide(tmp_path: Path) -> None:
    """Two `bash launch/sft_cpu.sh` runs (2 ranks each, default ports) started at once both succeed and each
    writes its own csv monitor files under its --output_dir, step column = optimizer steps 1..3 (the main
    config warms the learning rate up over 3 steps: a shorter run is refused)."""
    outs = [tmp_path / "a", tmp_path / "b"]
    env = _env()
    env.pop("MASTER_PORT", None)
    procs = [subprocess.Popen(["bash", "launch/sft_cpu.sh", "--steps", "3", "--output_dir", str(out)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for out in outs]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for out, p, log in zip(outs, procs, logs):
        assert p.returncode == 0, f"{out}:\n{log[-4000:]}"
        assert (out / "latest").exists()
        runs = list((out / "csv_monitor").glob("sft-*"))
        assert len(runs) == 1, runs
        loss_csv = runs[0] / "Train_chunkflow_loss.csv"
        assert _csv_steps(loss_csv) == [1, 2, 3], loss_csv.read_text()
        assert "data: " in log and " samples, " in log  # the loader's summary is printed


BAD_DATA = {
    # the model embeds 512 ids; the reloaded tokenizer has 513 ('<|endoftext|>' = 512): the example passes vocab_size
    "special_token": (json.dumps({"messages": [{"role": "user", "content": "a <|endoftext|> b"},
                                               {"role": "assistant", "content": "Ok."}]}), "", "token id 512"),
    "id_equal_to_vocab": (json.dumps({"input_ids": [5, 512]}), "", "'input_ids[1]' = 512"),
    # the config's max_seq_len reaches the loader
    "overlong": (json.dumps({"prompt": "word " * 100, "completion": " Ok."}), "  max_seq_len: 64\n", "max_seq_len=64"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_example_stops_at_load_time_naming_file_and_line(tmp_path: Path, case: str) -> None:
    """A bad line stops the example while the data loads (before DeepSpeed starts), naming file and line."""
    line, extra_config, problem = BAD_DATA[case]
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi.", "completion": " Hi!"}) + "\n" + line + "\n")
    config = tmp_path / "config.yaml"
    config.write_text("zero_optimization:\n  stage: 0\nchunkflow:\n  chunk_size: 64\n" + extra_config
                      + "  data:\n    global_batch_size: 2\n")
    proc = subprocess.run([*RECIPE, "--deepspeed_config", str(config), "--data", str(data),
                           "--steps", "1", "--output_dir", str(tmp_path / "run")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"DataError: {data}:2: " in proc.stderr and problem in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("script, launcher", [("sft_cpu.sh", "deepspeed"), ("sft_torchrun.sh", "torchrun"),
                                              ("sft_multinode.sh", "deepspeed")])
def test_launch_scripts_pass_a_port(tmp_path: Path, script: str, launcher: str) -> None:
    """MASTER_PORT reaches the launcher as --master_port; without it a free port is picked, not 29500."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / launcher).write_text('#!/bin/sh\necho "$@"\n')
    (fake / launcher).chmod(0o755)
    env = dict(_env(), MODEL="m", DATA="d")
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"

    def args(**extra: str) -> list[str]:
        proc = subprocess.run(["bash", f"launch/{script}", "--steps", "1"], cwd=ROOT, env=dict(env, **extra),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    given = args(MASTER_PORT="29611")
    assert given[given.index("--master_port") + 1] == "29611" and given[-2:] == ["--steps", "1"]
    env.pop("MASTER_PORT", None)
    picked = args()
    port = int(picked[picked.index("--master_port") + 1])
    assert 1024 <= port < 65536 and port != 29500


@pytest.mark.distributed
def test_recipe_lora_two_files_epochs_retention(tmp_path: Path) -> None:
    """`python -m ds_chunkflow.sft` in one process: LoRA on two data files (weights 1:1), one epoch (the step
    count is the sampler's), a checkpoint every step with --keep_checkpoints 1 (one tag left: the latest), and
    OUT/final is an adapter that PeftModel.from_pretrained loads onto the base with trained (non-zero) B.
    Equal weights split an epoch's 10 draws 5:5 (the files have 6 and 4 samples)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    files = []
    for name, n in (("a", 6), ("b", 4)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"Say {name} {i}.", "completion": f" {name} {i}!"}) + "\n"
                                for i in range(n)))
        files.append(str(path))
    config = tmp_path / "config.yaml"
    config.write_text("zero_optimization:\n  stage: 0\nchunkflow:\n  chunk_size: 16\n  data:\n    global_batch_size: 4\n")
    out = tmp_path / "run"
    proc = subprocess.run([*RECIPE, "--deepspeed_config", str(config), "--data", *files, "--data_weights", "1", "1",
                           "--epochs", "1", "--save_every", "1", "--keep_checkpoints", "1", "--lora_r", "4",
                           "--lr", "0.05", "--output_dir", str(out)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "samples drawn per source: a 5, b 5" in proc.stdout, proc.stdout[-2000:]  # 1:1 of 10 per epoch
    assert checkpoint_entries(str(out)) == ["latest", "global_step3"]  # 10 samples / 4 per batch: 3 steps
    base = AutoModelForCausalLM.from_pretrained(out / "tiny-qwen2")
    model = PeftModel.from_pretrained(base, str(out / "final"))
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and all(p.abs().sum() > 0 for p in b)
