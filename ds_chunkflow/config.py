"""The ``chunkflow`` section of a DeepSpeed config: the only reader of it.

Example (YAML; JSON works the same)::

    chunkflow:
      chunk_size: 4096        # tokens per chunk
      keep_chunks: 1          # K: chunks of one sequence holding activations at once
      max_seq_len: 262144     # guard: longer samples are an error (or skipped, counted)
      offload:
        activations: none     # none | far (offload instead of recomputing)
        kv_state_min_tokens: 131072
      recompute_layers: none  # none | all | N: activation checkpointing inside a chunk
      sequence_parallel:
        max_size: 1           # > 1: a long sample may run on up to this many ranks (Ulysses)
      data:
        global_batch_size: 64

Unknown keys and out-of-range values raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A bad ``chunkflow`` (or DeepSpeed) config value; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OffloadConfig(_Section):
    activations: Literal["none", "far"] = "none"
    """``far``: chunks whose backward is far away keep activations on the CPU instead of recomputing."""
    kv_state_min_tokens: int | None = Field(None, ge=0)
    """K/V state of sequences at least this long lives on the CPU (None: never)."""


class BalanceConfig(_Section):
    attention_cost_weight: float | None = Field(None, ge=0)
    """Cost of one attended (query, key) pair relative to one token; None: 1 / (6 * hidden_size)."""


class SequenceParallelConfig(_Section):
    max_size: int = Field(1, ge=1)
    """Most ranks that may run one long sample together (Ulysses: an all-to-all over heads around each
    attention); 1: off. A power of two; it must divide the data-parallel world size and the model's
    attention and key/value head counts (checked at start)."""
    all_to_all_cost_weight: float = Field(0.1, ge=0)
    """Cost of sending one token's attention inputs and output to another rank, relative to computing
    the token: ~0.1 within an NVLink node, ~1 across nodes; the cost model spreads a sample only where
    its compute saved outweighs this."""
    longer_chunks: bool = True
    """A sample spread over p ranks is cut into chunks of p x chunk_size tokens, so each rank computes
    chunk_size rows per call, as for an unspread chunk: p times fewer calls, all-to-alls, gradient
    reductions and recomputed chunks. false: chunks of chunk_size, each rank computing chunk_size / p
    rows per call (about 1/p of the activation memory per call, for the longest samples)."""

    @model_validator(mode="after")
    def _power_of_two(self):
        if self.max_size & (self.max_size - 1):
            raise ValueError(f"max_size must be a power of two (sequence-parallel blocks nest), got {self.max_size}")
        return self


class DataConfig(_Section):
    global_batch_size: int | None = Field(None, gt=0)
    """Samples per optimizer step (one of this or ``global_batch_tokens``)."""
    global_batch_tokens: int | None = Field(None, gt=0)
    """Token budget per optimizer step."""
    seed: int = 0
    """Shuffle seed (per epoch: seed + epoch)."""
    shuffle: bool = True
    """Reshuffle the samples every epoch; false: data order."""

    @model_validator(mode="after")
    def _one_budget(self):
        if self.global_batch_size is not None and self.global_batch_tokens is not None:
            raise ValueError("set only one of global_batch_size and global_batch_tokens")
        return self


class ChunkFlowConfig(_Section):
    enabled: bool = True
    """Route train_batch through ChunkFlow; false: plain DeepSpeed."""
    chunk_size: Annotated[int, Field(gt=0)] | Literal["auto"] = 4096
    """Tokens per chunk: short sequences are packed up to it, longer ones split every chunk_size tokens.
    ``auto``: the largest that fits ``memory_budget_gib``, chosen at engine start
    (:mod:`ds_chunkflow.deepspeed.autotune`)."""
    keep_chunks: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    """K: chunks that keep activations at once: of one long sequence (the rest are recomputed or offloaded),
    or standalone chunks that share one backward call (ZeRO-0/1/2: one gradient reduction per K chunks).
    ``auto``: the largest that fits ``memory_budget_gib`` (after chunk_size)."""
    memory_budget_gib: float | None = Field(None, gt=0)
    """Per-rank memory budget (GiB) that ``chunk_size: auto`` / ``keep_chunks: auto`` must fit; required by them."""
    max_seq_len: int | None = Field(None, gt=0)
    """Guard against runaway samples; None: no limit."""
    on_overlong: Literal["error", "skip"] = "error"
    """What a sample over max_seq_len does: error, or skip (counted and logged). Never truncated."""
    offload: OffloadConfig = Field(default_factory=OffloadConfig)
    """What lives on the CPU instead of the accelerator: far chunks' activations, long samples' K/V state."""
    balance: BalanceConfig = Field(default_factory=BalanceConfig)
    """The cost model that balances chunks over the data-parallel ranks."""
    data: DataConfig = Field(default_factory=DataConfig)
    """The global batch and its sampler (used when the engine gets ``training_data``)."""
    sequence_parallel: SequenceParallelConfig = Field(default_factory=SequenceParallelConfig)
    """Spreading one long sample over several data-parallel ranks (Ulysses over ChunkFlow's chunks)."""
    pad_token_id: int = Field(0, ge=0)
    """Token id of the one-token padding calls that keep ranks in step."""
    loss_piece_tokens: int = Field(1024, gt=0)
    """Target rows per piece of the chunked lm_head + cross-entropy: one piece's logits exist at a time."""
    recompute_layers: Literal["none", "all"] | int = "none"
    """Activation checkpointing inside a chunk: none, all decoder layers, or every N-th layer (N >= 1)."""

    @model_validator(mode="after")
    def _auto_needs_budget(self):
        auto = [k for k in ("chunk_size", "keep_chunks") if getattr(self, k) == "auto"]
        if auto and self.memory_budget_gib is None:
            raise ValueError(f"chunkflow.memory_budget_gib: required when {' and '.join(auto)} is auto "
                             "(the per-rank memory budget, in GiB, the automatic choice must fit)")
        if not auto and self.memory_budget_gib is not None:
            warnings.warn("chunkflow.memory_budget_gib has no effect: neither chunk_size nor keep_chunks is auto",
                          stacklevel=2)
        return self

    @model_validator(mode="after")
    def _recompute_every(self):
        if isinstance(self.recompute_layers, int) and self.recompute_layers < 1:
            raise ValueError(f"recompute_layers: 'none', 'all' or a positive integer N (every N-th layer), "
                             f"got {self.recompute_layers}")
        return self


def _format(err: ValidationError, section: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in (section, *e["loc"]))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e.get("input") is not None and e["type"] != "model_type":
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{key}: {msg}")
    return "; ".join(lines)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Reads a ds_config from JSON (``.json``) or YAML (anything else)."""
    path = Path(path)
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json and yaml errors both carry line/column in their str
        raise ConfigError(f"{path}: cannot parse config: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a ds_config must be a mapping, got {type(data).__name__}")
    return data


def split_config(config: dict[str, Any] | str | Path,
                 pipeline: bool = False) -> tuple[ChunkFlowConfig | None, dict[str, Any]]:
    """Separates the ``chunkflow`` section from the rest of a ds_config and validates both.

    Returns ``(None, ds_config)`` when the section is absent or disabled; otherwise the
    DeepSpeed keys ChunkFlow depends on are checked and given their ChunkFlow values
    (``train_micro_batch_size_per_gpu: 1``, ``gradient_accumulation_steps: 1``).
    ``pipeline``: the model is a ``PipelineModule``.
    """
    if not isinstance(config, dict):
        config = load_config_file(config)
    ds_config = {k: v for k, v in config.items() if k != "chunkflow"}
    section = config.get("chunkflow")
    if section is None:
        return None, ds_config
    if not isinstance(section, dict):
        raise ConfigError(f"chunkflow: must be a mapping, got {type(section).__name__}")
    try:
        cf = ChunkFlowConfig(**section)
    except ValidationError as e:
        raise ConfigError(_format(e, "chunkflow")) from None
    if not cf.enabled:
        return None, ds_config
    check_deepspeed_keys(cf, ds_config, pipeline)
    ds_config.setdefault("train_micro_batch_size_per_gpu", 1)
    ds_config.setdefault("gradient_accumulation_steps", 1)
    return cf, ds_config


def check_deepspeed_keys(cf: ChunkFlowConfig, ds_config: dict[str, Any], pipeline: bool = False) -> None:
    """DeepSpeed keys that ChunkFlow replaces are refused or warned about, never silently ignored."""
    if "train_batch_size" in ds_config:
        raise ConfigError(
            f"train_batch_size: not used with chunkflow (got {ds_config['train_batch_size']}); a train_batch is one "
            "whole global batch, set by chunkflow.data.global_batch_size / global_batch_tokens or by the list "
            "passed to train_batch; remove train_batch_size")
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    if pipeline and cf.sequence_parallel.max_size > 1:
        raise ConfigError(f"chunkflow.sequence_parallel.max_size: {cf.sequence_parallel.max_size} is not supported "
                          "with pipeline parallelism (a PipelineModule): DeepSpeed's PipelineEngine sends one "
                          "activation tensor per micro-batch between neighbouring stages and gives each data-parallel "
                          "replica micro-batches of its own, so one chunk cannot be split over the replicas of a "
                          "stage. Use max_size: 1 (long samples still fit: dependent chunks, keep_chunks, "
                          "offload.activations: far)")
    if pipeline and stage > 1:
        raise ConfigError(f"zero_optimization.stage: {stage} is not possible with pipeline parallelism "
                          "(DeepSpeed's PipelineEngine supports ZeRO 0 or 1); use stage 0 or 1")
    for key in ("hybrid_engine", "tensor_parallel"):
        if (ds_config.get(key) or {}).get("enabled") or (ds_config.get(key) or {}).get("autotp_size"):
            raise ConfigError(f"{key}: not supported with chunkflow")
    gas = ds_config.get("gradient_accumulation_steps", 1)
    if gas != 1:
        raise ConfigError(
            f"gradient_accumulation_steps: must be 1 with chunkflow (got {gas}); one train_batch is one "
            "optimizer step over a whole global batch, set its size with chunkflow.data")
    ac = ds_config.get("activation_checkpointing") or {}
    for key in ("cpu_checkpointing", "partition_activations", "contiguous_memory_optimization"):
        if ac.get(key):
            raise ConfigError(
                f"activation_checkpointing.{key}: not supported with chunkflow; chunk activations are bounded "
                "by chunkflow.keep_chunks, use chunkflow.offload.activations: far for CPU offload")
    from ds_chunkflow.deepspeed.lr_schedule import check_scheduler

    check_scheduler(ds_config.get("scheduler"))  # a schedule that cannot reach its end names the key
    if "train_micro_batch_size_per_gpu" in ds_config and ds_config["train_micro_batch_size_per_gpu"] != 1:
        warnings.warn("train_micro_batch_size_per_gpu has no effect with chunkflow (chunks are the micro-batches)",
                      stacklevel=3)
