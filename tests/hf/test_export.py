"""Export to Hugging Face format (:mod:`ds_chunkflow.hf.export`): in training and offline, against
DeepSpeed's own consolidation (``zero_to_fp32``) of the same step's checkpoint."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from ds_chunkflow.hf.export import ExportError, ShardWriter, export_checkpoint, prepare_target, publish
from ds_chunkflow.testing.spawn import run_ranks
from tests.helpers.export_workers import train_and_export


def exported(directory) -> dict[str, torch.Tensor]:
    """Every tensor of an export, across its shards."""
    files = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(directory, f)))
    return out


def zero_to_fp32(ckpt_dir) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-rank run per case, shared by the tests below."""
    cache = {}

    def run(stage, tied, bf16=False):
        key = (stage, tied, bf16)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"export_{stage}_{tied}_{bf16}")
            run_ranks(train_and_export, stage, tied, bf16, str(out))
            cache[key] = out
        return cache[key]

    return run


CASES = [(2, False, False), (3, False, False), (3, True, False), (3, True, True)]
IDS = ["zero2", "zero3", "zero3-tied", "zero3-tied-bf16"]


@pytest.mark.distributed
@pytest.mark.parametrize("stage,tied,bf16", CASES, ids=IDS)
def test_export_equals_deepspeed_consolidation(runs, stage, tied, bf16):
    """The in-training export (sharded) holds every weight of DeepSpeed's zero_to_fp32 of the same
    step: bitwise in float32; in bf16 the exact cast of those fp32 masters. Tied weights once."""
    out = runs(stage, tied, bf16)
    ref = zero_to_fp32(out / "ckpt")
    for name, dtype in (("final", torch.bfloat16 if bf16 else torch.float32), ("final_fp32", torch.float32)):
        got = exported(out / name)
        expected = {k for k in ref if not (tied and k == "lm_head.weight")}
        assert set(got) == expected, set(got) ^ expected
        for k, t in got.items():
            assert t.dtype == dtype, (k, t.dtype)
            assert torch.equal(t, ref[k].to(dtype)), k
    assert json.loads((out / "final" / "config.json").read_text())["tie_word_embeddings"] == tied
    assert (out / "final" / "model.safetensors.index.json").exists(), "20 kB shards: the export is sharded"


@pytest.mark.distributed
@pytest.mark.parametrize("stage,tied", [(0, False), (1, True), (2, False), (3, True)],
                         ids=["zero0", "zero1-tied", "zero2", "zero3-tied"])
def test_converter_equals_in_training_export(runs, tmp_path, stage, tied):
    """``export_checkpoint`` (offline, no process group) gives the in-training export's tensors and config,
    for every ZeRO stage (ZeRO-0: the module's own state; 1-3: DeepSpeed's zero_to_fp32)."""
    out = runs(stage, tied)
    export_checkpoint(str(out / "ckpt"), str(tmp_path / "conv"))
    a, b = exported(out / "final"), exported(tmp_path / "conv")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (out / "final", tmp_path / "conv"))
    assert ca == cb


@pytest.mark.distributed
def test_export_loads_and_generates(runs):
    """from_pretrained loads the export (tied head tied again) with the trained weights, and generate runs."""
    from transformers import AutoModelForCausalLM

    out = runs(3, True)
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref = zero_to_fp32(out / "ckpt")
    for name, p in model.named_parameters():
        assert torch.equal(p, ref[name]), name
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, 7)


def test_export_refuses_a_directory_that_is_not_ours(tmp_path):
    """An existing target without our mark is refused (nothing written) unless overwrite."""
    target = tmp_path / "final"
    target.mkdir()
    (target / "precious.txt").write_text("x")
    with pytest.raises(ExportError, match="not a ds_chunkflow export"):
        prepare_target(str(target))
    assert (target / "precious.txt").exists()
    tmp = prepare_target(str(target), overwrite=True)
    publish(tmp, str(target))
    assert not (target / "precious.txt").exists()


def test_kill_between_renames_keeps_the_previous_export(tmp_path):
    """A kill after the old export was moved aside and before the new one took its place: the next
    export puts the old one back first, so a loadable previous export is never lost."""
    target = tmp_path / "final"
    first = prepare_target(str(target))
    ShardWriter(first).add("w", torch.ones(2))
    (tmp_path / first / "ds_chunkflow_export.json").write_text("{}")
    publish(first, str(target))
    os.replace(target, tmp_path / ".final.old")  # the first rename of the next publish, then a kill
    prepare_target(str(target))
    assert (target / "ds_chunkflow_export.json").exists()


def test_shard_writer_splits_by_size_and_indexes(tmp_path):
    """Shards stay under the limit (a larger tensor alone), named as transformers names them, with an
    index mapping every tensor to its file."""
    w = ShardWriter(str(tmp_path), max_shard_bytes=100)
    tensors = {"a": torch.zeros(10), "b": torch.zeros(10), "c": torch.zeros(40), "d": torch.zeros(1)}
    for k, t in tensors.items():
        w.add(k, t)
    names = w.close()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": names[0], "b": names[0], "c": names[1], "d": names[2]}
    assert exported(tmp_path).keys() == tensors.keys()


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_lora_exports_adapter_and_merged_model(tmp_path, stage):
    """LoRA on 2 ranks: the adapter directory loads with PeftModel.from_pretrained onto the untouched
    base, and the merged export equals PEFT's own merge_and_unload of it (base names, trained adapters)."""
    from peft import PeftModel

    from ds_chunkflow.testing.models import build_tiny_model
    from tests.helpers.export_workers import train_lora_and_export
    from tests.helpers.lora_workers import lora_model

    run_ranks(train_lora_and_export, stage, str(tmp_path))
    peft_model = PeftModel.from_pretrained(build_tiny_model("qwen2", seed=0), str(tmp_path / "adapter"))
    initial = {n: p for n, p in lora_model().named_parameters() if "lora_" in n}
    trained = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert trained.keys() == initial.keys() and all(not torch.equal(p, initial[n]) for n, p in trained.items())
    reference = peft_model.merge_and_unload().state_dict()
    merged = exported(tmp_path / "merged")
    assert set(merged) == set(reference)
    for name, t in merged.items():
        assert torch.allclose(t, reference[name], rtol=1e-6, atol=1e-7), name
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "qwen2"
