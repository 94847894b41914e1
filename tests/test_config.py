"""The chunkflow config section: typed, every bad key named, every shipped config loads."""

from pathlib import Path

import pytest
import torch

from ds_chunkflow.config import ChunkFlowConfig, ConfigError, load_config_file, split_config
from ds_chunkflow.runtime.batch_plan import plan_batch
from tests.helpers.reference import make_sequences

CONFIGS = sorted((Path(__file__).parent.parent / "ds_configs").glob("*"))


def test_shipped_configs_exist():
    """The repository ships JSON and YAML configs (and this test sees them)."""
    assert {p.suffix for p in CONFIGS} >= {".json", ".yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """Every file in ds_configs/ parses and validates; disabled sections give plain DeepSpeed."""
    from ds_chunkflow.recipes.sft import fill_total_steps

    raw = load_config_file(path)
    cf, ds = split_config(fill_total_steps(load_config_file(path), steps=30))  # as the recipe reads it
    assert "chunkflow" not in ds
    enabled = raw.get("chunkflow", {}).get("enabled", True)
    assert (cf is not None) == enabled
    if cf is not None:
        assert cf.chunk_size == raw["chunkflow"]["chunk_size"]


@pytest.mark.parametrize("section, key", [
    ({"chunk_sise": 128}, "chunkflow.chunk_sise: unknown key"),
    ({"chunk_size": 0}, "chunkflow.chunk_size"),
    ({"keep_chunks": 0}, "chunkflow.keep_chunks"),
    ({"max_seq_len": -5}, "chunkflow.max_seq_len"),
    ({"on_overlong": "truncate"}, "chunkflow.on_overlong"),
    ({"offload": {"activations": "all"}}, "chunkflow.offload.activations"),
    ({"offload": {"kv_state": 1}}, "chunkflow.offload.kv_state: unknown key"),
    ({"balance": {"attention_cost_weight": -1}}, "chunkflow.balance.attention_cost_weight"),
    ({"data": {"global_batch_size": 4, "global_batch_tokens": 100}}, "chunkflow.data"),
])
def test_bad_values_name_the_key(section, key):
    """An unknown key or an out-of-range value raises ConfigError naming the full key."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        split_config({"chunkflow": section})


def test_replaced_deepspeed_keys_are_refused():
    """DeepSpeed keys that ChunkFlow replaces are refused with the key named, not ignored."""
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        split_config({"gradient_accumulation_steps": 4, "chunkflow": {}})
    with pytest.raises(ConfigError, match="activation_checkpointing.cpu_checkpointing"):
        split_config({"activation_checkpointing": {"cpu_checkpointing": True}, "chunkflow": {}})


def test_yaml_and_json_agree(tmp_path):
    """The same config in YAML and in JSON gives the same typed section."""
    (tmp_path / "c.yaml").write_text("chunkflow:\n  chunk_size: 512\n  keep_chunks: 2\n")
    (tmp_path / "c.json").write_text('{"chunkflow": {"chunk_size": 512, "keep_chunks": 2}}')
    assert split_config(tmp_path / "c.yaml")[0] == split_config(tmp_path / "c.json")[0]


def test_unparsable_file_names_the_file(tmp_path):
    """A broken config file is reported with its path and the parser's line."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunkflow:\n  chunk_size: [1,\n")
    with pytest.raises(ConfigError, match="(?s)bad.yaml.*line 3"):
        load_config_file(bad)


def test_defaults_are_sane():
    """The defaults: enabled, chunk 4096, K=1, no guard, no offload."""
    cf = ChunkFlowConfig()
    assert (cf.enabled, cf.chunk_size, cf.keep_chunks, cf.max_seq_len, cf.offload.activations) == (
        True, 4096, 1, None, "none")


def test_overlong_sample_is_an_error_naming_it():
    """A sample over max_seq_len is rejected with its index and length, never truncated."""
    seqs = make_sequences([10, 50, 20], 64)
    with pytest.raises(ValueError, match=r"sample 1 .* 50 tokens > chunkflow.max_seq_len=40"):
        plan_batch(seqs, chunk_size=16, keep_chunks=1, max_seq_len=40)


def test_overlong_skip_is_counted():
    """With on_overlong: skip the sample is left out and counted; the others are whole."""
    seqs = make_sequences([10, 50, 20], 64)
    batch = plan_batch(seqs, chunk_size=16, keep_chunks=1, max_seq_len=40, on_overlong="skip")
    assert batch.num_skipped == 1
    assert [s["input_ids"].numel() for s in batch.sequences] == [10, 20]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batch.sequences, [seqs[0], seqs[2]]))


def test_deepspeed_keys_chunkflow_replaces_are_refused_not_dropped():
    """train_batch_size (a step is one global batch), ZeRO-2/3 with a pipeline and the hybrid engine are errors
    naming the key; the micro-batch and accumulation keys get ChunkFlow's values."""
    with pytest.raises(ConfigError, match="train_batch_size: not used with chunkflow"):
        split_config({"train_batch_size": 16, "chunkflow": {}})
    with pytest.raises(ConfigError, match="zero_optimization.stage: 2"):
        split_config({"zero_optimization": {"stage": 2}, "chunkflow": {}}, pipeline=True)
    with pytest.raises(ConfigError, match="hybrid_engine"):
        split_config({"hybrid_engine": {"enabled": True}, "chunkflow": {}})
    _, ds = split_config({"zero_optimization": {"stage": 2}, "chunkflow": {}})
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_accumulation_steps"] == 1


def test_sequence_parallelism_in_pipeline_mode_is_refused_with_its_reason():
    """A pipeline replica's chunk cannot be split over ranks: refused before any engine exists, saying why."""
    config = {"zero_optimization": {"stage": 1}, "chunkflow": {"sequence_parallel": {"max_size": 2}}}
    with pytest.raises(ConfigError, match="sequence_parallel.max_size: 2 .*one chunk cannot be split"):
        split_config(config, pipeline=True)
    assert split_config(config)[0].sequence_parallel.max_size == 2  # data parallelism takes it
