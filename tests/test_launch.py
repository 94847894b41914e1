"""The README's main command: the example through the deepspeed launcher on 2 CPU ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.distributed


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_deepspeed_launcher_runs_the_example(tmp_path):
    """`deepspeed --num_gpus 2 examples/sft.py` trains, lowers the loss, writes a checkpoint and wandb files."""
    launcher = Path(sys.executable).parent / "deepspeed"
    out = tmp_path / "run"
    proc = _run([str(launcher), "--num_gpus", "2", "examples/sft.py", "--deepspeed_config",
                 "ds_configs/sft_zero3.yaml", "--steps", "8", "--output_dir", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("loss "))
    first, last = (float(x) for x in line.split()[1:4:2])
    assert last < first, line
    assert (out / "latest").exists()
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run on disk"


def test_torchrun_resumes_the_example(tmp_path):
    """torchrun works too, and --resume continues from the checkpoint's step."""
    out = tmp_path / "run"
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "examples/sft.py",
            "--deepspeed_config", "ds_configs/zero1.json", "--output_dir", str(out)]
    first = _run(base + ["--steps", "2"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run(base + ["--steps", "4", "--resume"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 2" in second.stdout, second.stdout[-2000:]


def test_bad_config_fails_cleanly(tmp_path):
    """An unknown chunkflow key stops every rank with the key named and a non-zero exit."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("chunkflow:\n  chunk_size: 64\n  keep_chunk: 2\n")
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "examples/sft.py",
                 "--deepspeed_config", str(cfg), "--steps", "1", "--output_dir", str(tmp_path / "o")], tmp_path)
    assert proc.returncode != 0
    assert "chunkflow.keep_chunk: unknown key" in proc.stderr
