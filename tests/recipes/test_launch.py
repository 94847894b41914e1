"""The README's main command: the example through the deepspeed launcher on 2 CPU ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_deepspeed_launcher_module_mode_trains_evaluates_exports(tmp_path):
    """`deepspeed --num_gpus 2 --module ds_chunkflow.sft` (the installed recipe) trains and lowers the loss,
    evaluates on a held-out split every 4 steps and at the end (one named line each), writes a checkpoint,
    wandb files and OUT/final, which from_pretrained loads with the trained weights and generate runs on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_chunkflow.hf.export import checkpoint_state_dict

    launcher = Path(sys.executable).parent / "deepspeed"
    out = tmp_path / "run"
    proc = _run([str(launcher), "--num_gpus", "2", "--module", "ds_chunkflow.sft", "--deepspeed_config",
                 "ds_configs/sft_zero3.yaml", "--steps", "8", "--output_dir", str(out), "--eval_split", "0.05",
                 "--eval_every", "4"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("loss "))
    first, last = (float(x) for x in line.split()[1:4:2])
    assert last < first, line
    evals = [ln for ln in proc.stdout.splitlines() if ln.startswith("eval step ")]
    assert [ln.split(":")[0] for ln in evals] == ["eval step 4", "eval step 8"], evals
    assert float(evals[1].split()[4]) < float(evals[0].split()[4]), evals
    assert (out / "latest").exists()
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run on disk"
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    trained, _ = checkpoint_state_dict(str(out), (out / "latest").read_text().strip())
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name]), name
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_torchrun_resumes_the_example(tmp_path):
    """torchrun works too, and --resume continues from the checkpoint's step."""
    out = tmp_path / "run"
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ds_chunkflow.sft",
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
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ds_chunkflow.sft",
                 "--deepspeed_config", str(cfg), "--steps", "1", "--output_dir", str(tmp_path / "o")], tmp_path)
    assert proc.returncode != 0
    assert "chunkflow.keep_chunk: unknown key" in proc.stderr
