"""Crash-safe checkpoints (ds_chunkflow/deepspeed/checkpoint.py): the manifest, `latest`, validating load."""

import json
import os

import pytest
import torch

from ds_chunkflow.deepspeed import checkpoint as ck
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


def kill_at_manifest(monkeypatch):
    """Makes the next manifest write raise KeyboardInterrupt (a kill); returns the real writer."""
    write = ck.atomic_write_text

    def killed_at_manifest(path, text):
        if path.endswith(ck.MANIFEST):
            raise KeyboardInterrupt("killed while writing the manifest")
        write(path, text)

    monkeypatch.setattr(ck, "atomic_write_text", killed_at_manifest)
    return write


def test_kill_before_the_manifest_leaves_latest_alone(two_tags, monkeypatch):
    """The manifest is written before `latest` moves: a kill between the two keeps the old `latest`."""
    d, engine = two_tags
    kill_at_manifest(monkeypatch)
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
    """The SFT recipe: `--resume` alone means required, `--resume auto` optional, absent: no resume."""
    from ds_chunkflow.recipes.sft import build_parser

    src = open(os.path.join(os.path.dirname(__file__), "..", "..", "ds_chunkflow", "recipes", "sft.py")).read()
    p = build_parser()
    assert p.parse_args([]).resume is None
    assert p.parse_args(["--resume"]).resume == "required"
    assert p.parse_args(["--resume", "auto"]).resume == "auto"
    assert "resume_decision" in src


# ----------------------------------------------------------------------------- stock DeepSpeed tags
def _stock_tag(d, tag, step, dp=2, zero3=False, bf16=False):
    """A tag as plain DeepSpeed writes it for ``dp`` ranks (no manifest): the model states file(s) with the
    world sizes and step DeepSpeed records, and each rank's optimizer shard."""
    tag_dir = d / tag
    tag_dir.mkdir(parents=True)
    meta = {"module": {"w": torch.zeros(4)}, "dp_world_size": dp, "mp_world_size": 1, "global_steps": step}
    states = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(dp)] if zero3 else [
        "mp_rank_00_model_states.pt"]
    for name in states:
        torch.save(meta, tag_dir / name)
    prefix = "bf16_" if bf16 else ""
    for r in range(dp):
        torch.save({"state": torch.full((64,), float(r))}, tag_dir / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return tag_dir


@pytest.mark.parametrize("zero3, bf16", [(False, False), (True, False), (False, True)], ids=["zero2", "zero3", "bf16"])
def test_stock_deepspeed_tag_is_loadable_when_every_rank_file_is_there(tmp_path, zero3, bf16):
    """A directory written by plain DeepSpeed (no manifest anywhere): `latest` is used when every file its
    model states imply (dp_world_size ranks) is there; one rank's shard missing falls back to the older
    complete tag, naming the file; resolve_tag warns that there is no ChunkFlow manifest."""
    _stock_tag(tmp_path, "global_step3", 3, zero3=zero3, bf16=bf16)
    newest = _stock_tag(tmp_path, "global_step5", 5, zero3=zero3, bf16=bf16)
    (tmp_path / "latest").write_text("global_step5")
    r = ck.find_complete_tag(tmp_path)
    assert (r.tag, r.step, r.stock, r.skipped) == ("global_step5", 5, True, [])
    with pytest.warns(UserWarning, match="global_step5 .* has no ChunkFlow manifest"):
        assert ck.resolve_tag(tmp_path).stock
    shard = f"{'bf16_' if bf16 else ''}zero_pp_rank_1_mp_rank_00_optim_states.pt"
    (newest / shard).unlink()
    r = ck.find_complete_tag(tmp_path)
    assert (r.tag, r.step) == ("global_step3", 3)
    assert len(r.skipped) == 1 and f"missing file {shard}" in r.skipped[0], r.skipped
    if zero3:  # rank 1's model states are as necessary as its optimizer shard
        _stock_tag(tmp_path, "global_step7", 7, zero3=True).joinpath(
            "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
        (tmp_path / "latest").write_text("global_step7")
        assert "missing file zero_pp_rank_1_mp_rank_00_model_states.pt" in ck.find_complete_tag(tmp_path).skipped[0]


def test_stock_tag_with_a_damaged_shard_is_refused(tmp_path):
    """Same size check is impossible without a manifest, but a cut zip archive is still caught."""
    tag_dir = _stock_tag(tmp_path, "global_step3", 3)
    shard = tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 50)
    with pytest.raises(ck.CheckpointError, match="damaged file zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        ck.resolve_tag(tmp_path)


def _deepspeed_like_save(engine, killed_at_manifest=False):
    """A ds_save writing what DeepSpeed writes for one rank (model states with world sizes, one shard)."""

    def ds_save(save_dir, tag, client_state, save_latest, **kwargs):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        meta = {"dp_world_size": 1, "mp_world_size": 1, "global_steps": engine.global_steps}
        engine.checkpoint_engine.save(meta, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))
        engine.checkpoint_engine.save({"w": torch.zeros(8)}, os.path.join(save_dir, tag, OPTIM))
        return True

    return ds_save


def test_torn_chunkflow_save_never_passes_for_a_stock_tag(tmp_path, monkeypatch):
    """A ChunkFlow save killed after DeepSpeed wrote every file but before the manifest, in a directory
    holding no other tag, looks like a complete stock tag; its saving mark keeps it refused."""
    engine = _FakeEngine()
    engine.global_steps = 4
    write = kill_at_manifest(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(engine, _deepspeed_like_save(engine), tmp_path)
    monkeypatch.setattr(ck, "atomic_write_text", write)
    r = ck.find_complete_tag(tmp_path)
    assert r.tag is None and "did not finish" in r.found, r.found
    with pytest.raises(ck.CheckpointError, match="did not finish"):
        ck.resolve_tag(tmp_path, "global_step4")
    ck.save_checkpoint(engine, _deepspeed_like_save(engine), tmp_path)  # a finished save: the mark is gone
    assert not (tmp_path / "global_step4" / ck.SAVING).exists()
    assert (ck.find_complete_tag(tmp_path).tag, ck.find_complete_tag(tmp_path).stock) == ("global_step4", False)


def test_stock_tag_in_a_chunkflow_directory_loads_only_when_named(two_tags):
    """Among ChunkFlow tags, a manifest-less tag is a torn save for the automatic choice; named
    explicitly, a stock-complete one loads (a warm start), marked stock."""
    d, _ = two_tags
    _stock_tag(d, "global_step9", 9)
    r = ck.find_complete_tag(d)
    assert (r.tag, r.stock) == ("global_step2", False)
    with pytest.warns(UserWarning, match="no ChunkFlow manifest"):
        r = ck.resolve_tag(d, "global_step9")
    assert (r.tag, r.step, r.stock) == ("global_step9", 9, True)


def test_restore_sampler_without_position(tmp_path):
    """No sampler position: a stock tag warns and leaves the sampler at its start; a ChunkFlow tag is an
    error naming the key; a position present is loaded (and popped from the client state)."""

    class Sampler:
        state = "start"

        def load_state_dict(self, state):
            self.state = state

    sampler = Sampler()
    with pytest.warns(UserWarning, match="plain DeepSpeed.*no data-sampler position"):
        ck.restore_sampler(sampler, {}, "key", "ckpt/t", ck.Resolved("t", stock=True))
    assert sampler.state == "start"
    with pytest.raises(ValueError, match=r"no data-sampler position \(key\)"):
        ck.restore_sampler(sampler, None, "key", "ckpt/t", ck.Resolved("t"))
    client = {"key": "pos", "other": 1}
    ck.restore_sampler(sampler, client, "key", "ckpt/t", ck.Resolved("t"))
    assert sampler.state == "pos" and client == {"other": 1}


def test_example_uses_the_public_checkpoint_listing():
    """The SFT recipe decides "this output_dir holds checkpoints" with ds_chunkflow.deepspeed.checkpoint's own
    checkpoint_entries, not a copy of its tag detection."""
    src = open(os.path.join(os.path.dirname(__file__), "..", "..", "ds_chunkflow", "recipes", "sft.py")).read()
    assert "checkpoint_entries(args.output_dir)" in src
    assert "model_states.pt" not in src and "startswith(\"global_step\")" not in src


# ----------------------------------------------------------------------------- 2 ranks, DeepSpeed
@pytest.mark.parametrize("stage", [2, 3])
def test_damaged_newest_checkpoint_resumes_exactly_from_the_previous(tmp_path, stage):
    """Saves after steps 2 and 3 of a 5-step run; the step-3 tag is damaged three ways (a truncated
    shard of rank 1; an empty `latest` and no manifest; rank 1's files deleted); each resume loads
    global_step2 on both ranks with one warning naming global_step3 and why, and continues with
    bitwise the uninterrupted run's losses. One spawn per stage."""
    from tests.helpers.checkpoint_workers import save_damage_resume

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
    from tests.helpers.checkpoint_workers import pipeline_save_damage_resume

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


def test_plain_deepspeed_checkpoint_warm_starts_a_chunkflow_engine(tmp_path):
    """A checkpoint written by plain DeepSpeed (2 ranks, ZeRO-2: no manifest, no sampler position) loads
    into a ChunkFlow engine on both ranks: the weights are the saved ones bitwise, one warning says there
    is no ChunkFlow manifest, one that the data starts from its beginning, and training goes on."""
    from tests.helpers.checkpoint_workers import stock_save_then_chunkflow_load

    run_ranks(stock_save_then_chunkflow_load, 2, str(tmp_path / "ckpt"), str(tmp_path / "out"), timeout=150)
    for rank in range(2):
        r = torch.load(tmp_path / f"out.{rank}")
        assert (r["tag"], r["stock"], r["step"]) == ("global_step2", True, 3), r
        assert r["same"] and r["loss"] == r["loss"], r
        assert ck.MANIFEST not in r["files"] and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in r["files"], r["files"]
        sampler = [w for w in r["warnings"] if "no data-sampler position" in w]
        assert len(sampler) == 1, r["warnings"]
        if rank == 0:
            assert len([w for w in r["warnings"] if "no ChunkFlow manifest" in w]) == 1, r["warnings"]
