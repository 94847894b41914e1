"""Crash-safe checkpoints (ds_chunkflow/checkpoint.py): the manifest, `latest`, validating load."""

import json
import os

import pytest
import torch

from ds_chunkflow import checkpoint as ck
from ds_chunkflow.testing.spawn import run_ranks


# ----------------------------------------------------------------------------- single process, no DeepSpeed
class _FakeCheckpointEngine:
    def save(self, state_dict, path):
        torch.save(state_dict, path)

    def is_decoupled(self):
        return False


class _FakeEngine:
    def __init__(self):
        self.global_steps = 0
        self.checkpoint_engine = _FakeCheckpointEngine()


def _ds_save(engine, fail_after=None):
    """Writes two files the way DeepSpeed does (through checkpoint_engine.save); optionally crashes."""

    def ds_save(save_dir, tag, client_state, save_latest, **kwargs):
        assert save_latest is False  # `latest` is ours to write
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        for i, name in enumerate(["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]):
            if fail_after is not None and i == fail_after:
                raise KeyboardInterrupt("killed mid-save")
            engine.checkpoint_engine.save({"w": torch.full((64,), float(engine.global_steps))},
                                          os.path.join(save_dir, tag, name))
        return True

    return ds_save


def _save(d, engine, step, fail_after=None):
    engine.global_steps = step
    return ck.save_checkpoint(engine, _ds_save(engine, fail_after), d)


@pytest.fixture
def two_tags(tmp_path):
    engine = _FakeEngine()
    _save(tmp_path, engine, 1)
    _save(tmp_path, engine, 2)
    return tmp_path, engine


OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def test_save_writes_manifest_then_latest(two_tags):
    d, engine = two_tags
    assert (d / "latest").read_text() == "global_step2"
    m = json.loads((d / "global_step2" / ck.MANIFEST).read_text())
    assert m["global_step"] == 2 and m["world_size"] == 1
    assert {f["path"] for f in m["files"]} == {"mp_rank_00_model_states.pt", OPTIM}
    assert all(f["zip"] and f["size"] == os.path.getsize(d / "global_step2" / f["path"]) for f in m["files"])
    assert not [p for p in os.listdir(d) if p.endswith(".tmp")]
    r = ck.find_complete_tag(d)
    assert (r.tag, r.step, r.skipped) == ("global_step2", 2, [])
    assert engine.checkpoint_engine.save.__func__ is _FakeCheckpointEngine.save  # the spy is gone


@pytest.mark.parametrize("damage, reason", [
    ("truncate", f"truncated file {OPTIM} of rank 0"),
    ("zero_tail", f"damaged file {OPTIM} of rank 0: not a readable zip archive"),
    ("delete", f"missing file {OPTIM} of rank 0"),
    ("no_manifest", "no manifest"),
    ("bad_manifest", "unreadable manifest"),
])
def test_damaged_newest_tag_falls_back_with_reason(two_tags, damage, reason):
    d, _ = two_tags
    path = d / "global_step2" / OPTIM
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(1600)
    elif damage == "zero_tail":  # same size, end of the zip archive gone
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.seek(size - 100)
            f.write(b"\0" * 100)
    elif damage == "delete":
        path.unlink()
    elif damage == "no_manifest":
        (d / "global_step2" / ck.MANIFEST).unlink()
    else:
        (d / "global_step2" / ck.MANIFEST).write_text("{\"files\": [")
    r = ck.find_complete_tag(d)
    assert (r.tag, r.step) == ("global_step1", 1)
    assert len(r.skipped) == 1 and r.skipped[0].startswith("global_step2 (named by `latest`)"), r.skipped
    assert reason in r.skipped[0], r.skipped
    with pytest.warns(UserWarning, match="global_step2") as w:
        assert ck.resolve_tag(d).tag == "global_step1"
    assert reason in str(w[0].message)
    with pytest.raises(ck.CheckpointError, match="global_step2 .* incomplete or damaged"):
        ck.resolve_tag(d, "global_step2")  # an explicit tag is never swapped for another


@pytest.mark.parametrize("latest", ["", "\n", None])
def test_empty_or_missing_latest_uses_newest_complete_tag(two_tags, latest):
    d, _ = two_tags
    if latest is None:
        (d / "latest").unlink()
    else:
        (d / "latest").write_text(latest)
    r = ck.find_complete_tag(d)
    assert (r.tag, r.step) == ("global_step2", 2)
    assert r.skipped == ["no `latest` file" if latest is None else "empty `latest` file"]


def test_kill_mid_save_leaves_latest_on_the_previous_tag(two_tags):
    d, engine = two_tags
    with pytest.raises(KeyboardInterrupt):
        _save(d, engine, 3, fail_after=1)
    assert (d / "latest").read_text() == "global_step2"
    assert ck.find_complete_tag(d).tag == "global_step2"
    # rewriting an existing tag: it stops counting as complete before its files change
    with pytest.raises(KeyboardInterrupt):
        _save(d, engine, 2, fail_after=1)
    r = ck.find_complete_tag(d)
    assert r.tag == "global_step1" and "no manifest" in r.skipped[0], r.skipped


def test_kill_before_the_manifest_leaves_latest_alone(two_tags, monkeypatch):
    """The manifest is written before `latest` moves: a kill between the two keeps the old `latest`."""
    d, engine = two_tags
    write = ck.atomic_write_text

    def killed_at_manifest(path, text):
        if path.endswith(ck.MANIFEST):
            raise KeyboardInterrupt("killed while writing the manifest")
        write(path, text)

    monkeypatch.setattr(ck, "atomic_write_text", killed_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        _save(d, engine, 3)
    assert (d / "latest").read_text() == "global_step2"
    r = ck.find_complete_tag(d)
    assert r.tag == "global_step2" and r.skipped == [], r.skipped  # the half-saved newer tag is not used


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    target.write_text("global_step1")
    monkeypatch.setattr(ck.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        ck.atomic_write_text(str(target), "global_step2")
    assert target.read_text() == "global_step1" and os.listdir(tmp_path) == ["latest"]  # no temp file left


def test_no_complete_tag_is_an_error_naming_the_directory(tmp_path):
    engine = _FakeEngine()
    _save(tmp_path, engine, 1)
    (tmp_path / "global_step1" / OPTIM).unlink()
    with pytest.raises(ck.CheckpointError) as e:
        ck.resolve_tag(tmp_path)
    assert str(tmp_path) in str(e.value) and f"missing file {OPTIM}" in str(e.value)
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.resolve_tag(tmp_path / "nowhere")


def test_resume_decision(tmp_path):
    empty = tmp_path / "out"
    empty.mkdir()
    assert ck.resume_decision(empty, None) is None
    assert ck.resume_decision(empty, "auto") is None
    with pytest.raises(ck.CheckpointError) as e:
        ck.resume_decision(empty, "required")
    assert str(empty) in str(e.value) and "--resume" in str(e.value)
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.resume_decision(tmp_path / "nowhere", "required")
    _save(empty, _FakeEngine(), 4)
    assert ck.resume_decision(empty, "required").tag == "global_step4"
    assert ck.resume_decision(empty, "auto").step == 4


def test_example_resume_argument_parsing():
    """examples/sft.py: `--resume` alone means required, `--resume auto` optional, absent: no resume."""
    import argparse
    import ast

    src = open(os.path.join(os.path.dirname(__file__), "..", "examples", "sft.py")).read()
    call = next(node for node in ast.walk(ast.parse(src)) if isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "add_argument"
                and node.args and getattr(node.args[0], "value", None) == "--resume")
    parser = argparse.ArgumentParser()
    eval(compile(ast.Expression(call), "sft.py", "eval"), {"parser": parser})  # the example's own definition
    p = parser
    assert p.parse_args([]).resume is None
    assert p.parse_args(["--resume"]).resume == "required"
    assert p.parse_args(["--resume", "auto"]).resume == "auto"
    assert "resume_decision" in src


# ----------------------------------------------------------------------------- 2 ranks, DeepSpeed
@pytest.mark.parametrize("stage", [2, 3])
def test_damaged_newest_checkpoint_resumes_exactly_from_the_previous(tmp_path, stage):
    """Saves after steps 2 and 3 of a 5-step run; the step-3 tag is damaged three ways (a truncated
    shard of rank 1; an empty `latest` and no manifest; rank 1's files deleted); each resume loads
    global_step2 on both ranks with one warning naming global_step3 and why, and continues with
    bitwise the uninterrupted run's losses. One spawn per stage."""
    from checkpoint_workers import save_damage_resume

    cases = ["truncate", "empty_latest", "delete"]
    run_ranks(save_damage_resume, stage, str(tmp_path), str(tmp_path / "out"), 5, cases, timeout=150)
    out = torch.load(tmp_path / "out.0")
    full = out["full"]
    assert len(set(full)) == 5, full  # every step's loss differs, so a resume from the wrong place shows
    for how, reason, r in zip(cases, out["reasons"], out["resumed"]):
        assert "error" not in r, (how, r)
        assert (r["tag"], r["step"]) == ("global_step2", 2), (how, r)
        assert len(r["warnings"]) == 1 and "global_step3" in r["warnings"][0], (how, r["warnings"])
        assert reason in r["warnings"][0], (how, reason, r["warnings"])
        assert r["losses"] == full[2:], (how, r["losses"], full)
    assert [r["tag"] for r in torch.load(tmp_path / "out.1")["resumed"]] == ["global_step2"] * 3  # rank 1 agrees


def test_pipeline_engine_checkpoint_falls_back_exactly(tmp_path):
    """ChunkFlowPipelineEngine (2 stages, ZeRO-0) saves through the same mixin: both stages' layer
    files are in the manifest; with rank 1's files of the newest tag deleted, a resume loads the
    previous tag with a warning and continues with the uninterrupted run's losses (last stage's)."""
    from checkpoint_workers import pipeline_save_damage_resume

    run_ranks(pipeline_save_damage_resume, str(tmp_path / "ckpt"), str(tmp_path / "out"), timeout=150)
    r0, r1 = (torch.load(tmp_path / f"out.{r}") for r in range(2))
    assert {f["rank"] for f in r0["files"]} == {0, 1}
    assert any(f["path"].startswith("layer_") and f["rank"] == 1 for f in r0["files"]), r0["files"]
    for r in (r0, r1):
        assert (r["tag"], r["step"]) == ("global_step1", 1), r
    assert len(r0["warnings"]) == 1 and "missing file" in r0["warnings"][0] and "of rank 1" in r0["warnings"][0]
    last = r1  # the pipeline's loss is computed on the last stage
    assert len(set(last["full"])) == 3, last["full"]
    assert last["resumed"] == last["full"][1:], (last["resumed"], last["full"])
