"""Checkpoint retention (ds_chunkflow/deepspeed/retention.py): the newest N complete tags stay, a kill never strands a run.

Tags are written by ds_chunkflow.deepspeed.checkpoint.save_checkpoint itself around a fake DeepSpeed save (no
process group), so manifests, saving marks and ``latest`` are the real ones.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ds_chunkflow.deepspeed import checkpoint as ck
from ds_chunkflow.deepspeed.retention import plan_prune, prune_checkpoints

FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")


class _Engine:
    """What ck.save_checkpoint uses of a DeepSpeed engine."""

    def __init__(self):
        self.global_steps = 0
        self.checkpoint_engine = self

    def save(self, state, path):
        torch.save(state, path)

    def is_decoupled(self):
        return False


def save(d, step, save_latest=True, torn=False):
    """A ChunkFlow save of tag global_step<step>; ``torn``: killed before its manifest (saving mark left)."""
    engine = _Engine()
    engine.global_steps = step

    def ds_save(save_dir, tag, client_state, save_latest, **kwargs):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        for name in FILES:
            engine.save({"w": torch.full((16,), float(step))}, os.path.join(save_dir, tag, name))
        if torn:
            raise KeyboardInterrupt("killed before the manifest")

    try:
        ck.save_checkpoint(engine, ds_save, d, save_latest=save_latest)
    except KeyboardInterrupt:
        assert torn


def tags(d):
    """Tag directories (and trash), not ``latest`` nor the temporary file a kill inside its atomic write
    leaves (``.latest.*.tmp``: a file, never read as a tag)."""
    return sorted(n for n in os.listdir(d) if n != ck.LATEST and os.path.isdir(os.path.join(d, n)))


def test_keeps_the_newest_complete_tags_and_latest(tmp_path):
    """keep=2 of five saves leaves the two newest; ``latest`` naming an older tag keeps it too; a torn newer
    save is neither counted nor deleted, a torn older one is deleted; a stock DeepSpeed tag is never touched."""
    for step in range(1, 6):
        save(tmp_path, step)
    assert prune_checkpoints(tmp_path, keep=2) == ["global_step1", "global_step2", "global_step3"]
    assert tags(tmp_path) == ["global_step4", "global_step5"]
    assert ck.find_complete_tag(tmp_path).tag == "global_step5"

    save(tmp_path, 6, save_latest=False)  # latest stays at global_step5
    save(tmp_path, 7, torn=True)  # the newest save was killed: not complete, not deleted
    (tmp_path / "stock").mkdir()
    (tmp_path / "stock" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    plan = plan_prune(tmp_path, keep=1)
    assert plan.delete == ["global_step4"] and set(plan.keep) == {"global_step6", "global_step5"}, plan
    prune_checkpoints(tmp_path, keep=1)
    assert tags(tmp_path) == ["global_step5", "global_step6", "global_step7", "stock"]

    save(tmp_path, 3, torn=True)  # a torn save older than the newest complete tag: never resumable, deleted
    assert "global_step3" in plan_prune(tmp_path, keep=5).delete


def test_refuses_keep_below_one(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, keep=0)


def test_other_ranks_do_nothing(tmp_path):
    for step in range(1, 4):
        save(tmp_path, step)
    assert prune_checkpoints(tmp_path, keep=1, rank=1) == [] and len(tags(tmp_path)) == 3


class _Killed(BaseException):
    pass


def test_a_kill_at_any_filesystem_operation_leaves_a_resumable_directory(tmp_path, monkeypatch):
    """Pruning killed before each of its renames / unlinks / rmdirs in turn: every time, the tag a resume
    picks is ``latest``'s, complete, every kept tag is whole, a tag still visible under its own name is
    whole (never half-deleted), and the next prune finishes the job (no leftovers)."""
    template = tmp_path / "template"
    template.mkdir()
    for step in range(1, 6):
        save(template, step)
    expected = ["global_step4", "global_step5"]
    real = {name: getattr(os, name) for name in ("rename", "unlink", "rmdir")}
    kill_at, crashed = 0, True
    while crashed:
        d = tmp_path / f"k{kill_at}"
        shutil.copytree(template, d)
        count = [0]

        def op(name):
            def wrapped(*args, **kwargs):
                if count[0] == kill_at:
                    raise _Killed(f"killed before {name} #{kill_at}")
                count[0] += 1
                return real[name](*args, **kwargs)
            return wrapped

        for name in real:
            monkeypatch.setattr(os, name, op(name))
        try:
            prune_checkpoints(d, keep=2)
            crashed = False
        except _Killed:
            pass
        finally:
            for name, fn in real.items():
                monkeypatch.setattr(os, name, fn)
        found = ck.find_complete_tag(d)
        assert found.tag == "global_step5" and not found.skipped, (kill_at, found)
        for tag in tags(d):
            if not ck.is_trash(tag):
                assert ck.check_tag(d, tag)[0] is not None, (kill_at, tag, "visible but not whole")
        prune_checkpoints(d, keep=2)
        assert tags(d) == expected, (kill_at, tags(d))
        kill_at += 1
    assert kill_at > 10, "the prune made too few operations to be tested at each"  # 3 tags x (rename + files)


REPO = str(Path(__file__).resolve().parents[2])  # the child imports tests.deepspeed.test_retention
CHILD = r"""
import os, sys, time
import torch
from tests.deepspeed.test_retention import save
from ds_chunkflow.deepspeed.checkpoint import find_complete_tag
from ds_chunkflow.deepspeed.retention import prune_checkpoints
d, steps = sys.argv[1], int(sys.argv[2])
found = find_complete_tag(d)
start = found.step + 1 if found.tag is not None else 1
for step in range(start, steps + 1):
    print("save", step, flush=True)
    save(d, step)
    print("prune", step, flush=True)
    prune_checkpoints(d, keep=2)
    print("done", step, flush=True)
"""


def _kill_child(script, d, rng, in_prune):
    """Starts the child on ``d`` and SIGKILLs it: ``in_prune``: a few ms after it announced the start of a
    prune (its k-th, k random); else at a random moment up to 0.3 s into its save / prune loop. Returns the
    last phase the child announced (save, prune or done)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    p = subprocess.Popen([sys.executable, str(script), str(d), str(10**9)], stdout=subprocess.PIPE, env=env,
                         text=True)  # steps without end: only the kill stops it
    lines, target = [], rng.randint(1, 4) if in_prune else 1
    while sum(ln.startswith("prune") for ln in lines) < target:
        line = p.stdout.readline()
        assert line, f"the child stopped by itself: {lines[-3:]}"
        lines.append(line)
    time.sleep(rng.uniform(0.0, 0.003) if in_prune else rng.uniform(0.0, 0.3))
    p.send_signal(signal.SIGKILL)
    lines += p.stdout.read().splitlines()
    p.wait()
    return lines[-1].split()[0]


def test_sigkill_at_random_moments_never_leaves_an_unresumable_directory(tmp_path):
    """A process saving (and pruning to 2 tags after each save) is SIGKILLed at random (seeded) moments, half of
    them just after it began a prune, and resumed from what it left, again and again: after every kill the
    directory resolves to a complete tag (``latest``'s), no half-deleted tag is visible, the resumed process
    continues from the next step, and at the end exactly the two newest tags remain."""
    d, rng = tmp_path / "ckpt", random.Random(0)
    d.mkdir()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    phases, last = [], 0
    for trial in range(4):
        phases.append(_kill_child(script, d, rng, in_prune=trial % 2 == 1))
        found = ck.find_complete_tag(d)
        assert found.tag is not None and found.tag == ck.read_latest(d)[0], (trial, found)
        assert found.step >= last, (trial, found.step, last)  # never behind what was complete before
        last = found.step
        for tag in tags(d):
            if not ck.is_trash(tag) and ck.check_tag(d, tag)[0] is None:
                assert int(tag.removeprefix("global_step")) == found.step + 1, (trial, tag, "incomplete")
    final = last + 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    subprocess.run([sys.executable, str(script), str(d), str(final)], check=True, env=env, stdout=subprocess.DEVNULL)
    assert tags(d) == [f"global_step{final - 1}", f"global_step{final}"], tags(d)
    assert "prune" in phases, phases  # at least one kill landed inside a prune
