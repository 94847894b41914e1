"""Hugging Face model directories from a run: in training (:func:`save_pretrained`, any ZeRO stage) and
offline from a complete checkpoint (:func:`export_checkpoint`, ``python -m ds_chunkflow.hf.export``).

What a directory holds::

    OUT/final/
      config.json                  the model's config, ``dtype`` set to the exported dtype
      generation_config.json       when the model has one
      model.safetensors            or model-0000i-of-0000n.safetensors + model.safetensors.index.json
      tokenizer files              when a tokenizer was given (or saved with the checkpoint)
      ds_chunkflow_export.json     step, dtype, source: marks the directory as ours

Loadable with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

Guarantees:

* **ZeRO-3**: parameters are gathered one module at a time (every rank takes part; rank 0 copies
  the full tensors to the CPU and writes them), and shards are written as they fill, so neither the
  whole model on one device nor on the CPU of rank 0 is ever needed beyond one shard.
* **dtype**: the training dtype by default (the parameters as trained); ``float32`` writes the fp32
  master weights (DeepSpeed's ``safe_get_full_fp32_param``), any other dtype is their cast.
* **Tied weights** are written once (the input embedding); ``from_pretrained`` ties them again.
* **Atomic**: written to ``.<name>.tmp-*`` beside the target and renamed when complete. An existing
  target is first renamed to ``.<name>.old`` and removed only after the new one is in place, so a kill
  leaves either the old directory or the new one (a leftover ``.old`` is put back by the next export).
  A target that exists and is not ours (no ``ds_chunkflow_export.json``) is refused unless ``overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import tempfile
from typing import Iterator

import torch
import torch.distributed as dist

MARK = "ds_chunkflow_export.json"
HF_META = "hf_model"  # inside a checkpoint tag: config.json, generation_config.json, tokenizer files
DEFAULT_SHARD_BYTES = 5 * 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(RuntimeError):
    """An export that cannot be made (a target that is not ours, a checkpoint we cannot convert)."""


# ----------------------------------------------------------------------------- writing
class ShardWriter:
    """Streams ``(name, tensor)`` into safetensors shards of at most ``max_shard_bytes`` (a larger
    tensor gets a shard of its own); :meth:`close` names them as transformers does and writes the index."""

    def __init__(self, directory: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu", copy=True).contiguous()  # gathered storage is released
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self._pending, os.path.join(self.directory, f".shard-{len(self._shards)}"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Renames the shards (``model.safetensors`` when there is one) and writes the index; returns the files."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(os.path.join(self.directory, f".shard-{i}"), os.path.join(self.directory, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: names[i] for i, keys in enumerate(self._shards) for k in keys}}
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        return names


def parse_size(size: int | str) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / bytes -> bytes."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for suffix, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                           ("KB", 10**3), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def _old(target: str) -> str:
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.old")


def prepare_target(target: str, overwrite: bool = False) -> str:
    """Checks ``target`` may be (re)written and returns a fresh temporary directory beside it."""
    target = os.path.abspath(target)
    if not os.path.exists(target) and os.path.isdir(_old(target)):  # a kill between the two renames
        os.replace(_old(target), target)
    if os.path.exists(target) and not os.path.isfile(os.path.join(target, MARK)) and not overwrite:
        raise ExportError(f"{target} exists and is not a ds_chunkflow export (no {MARK}); choose another "
                          "directory or pass --overwrite to replace it")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=os.path.dirname(target))


def publish(tmp: str, target: str) -> None:
    """Moves a complete ``tmp`` to ``target``; the previous ``target`` survives any kill on the way."""
    target = os.path.abspath(target)
    if os.path.exists(target):
        shutil.rmtree(_old(target), ignore_errors=True)
        os.replace(target, _old(target))
    os.replace(tmp, target)
    shutil.rmtree(_old(target), ignore_errors=True)


def write_metadata(directory: str, config, dtype: torch.dtype, generation_config=None, tokenizer=None,
                   mark: dict | None = None) -> None:
    """config.json (with ``dtype``), generation_config.json, the tokenizer and our mark."""
    import copy

    config = copy.deepcopy(config)
    config.dtype = dtype
    config.save_pretrained(directory)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if mark is not None:
        with open(os.path.join(directory, MARK), "w") as f:
            json.dump({**mark, "dtype": str(dtype).removeprefix("torch.")}, f, indent=1)


# ----------------------------------------------------------------------------- in training
def _persistent_buffers(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, buf in module.named_buffers(recurse=False):
        if buf is not None and name not in module._non_persistent_buffers_set:
            yield name, buf


def _lora_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    return LoraLayer


def full_tensors(model: torch.nn.Module, dtype: torch.dtype, zero3: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` of every parameter (once, under its first name) and persistent buffer,
    one module at a time. Collective under ZeRO (gathers, fp32 masters): call on every rank.

    A PEFT LoRA model is written merged, under the base model's names: each LoRA layer (its base
    layer and adapters gathered together) gives ``weight = W + delta`` (PEFT's ``get_delta_weight``,
    computed in float32 from the adapters' values in ``dtype``'s source, see :func:`_value`)."""
    import deepspeed

    from ds_chunkflow.hf.model import base_model_of, is_peft_model

    lora_cls = _lora_layer_class() if is_peft_model(model) else None
    root = base_model_of(model) if lora_cls is not None else model
    seen: set[int] = set()
    merged_prefixes: list[str] = []
    for prefix, module in root.named_modules():
        if any(prefix.startswith(m + ".") for m in merged_prefixes):
            continue  # inside a merged LoRA layer: written with it
        merge = lora_cls is not None and isinstance(module, lora_cls)
        if merge:
            merged_prefixes.append(prefix)
        params = [(n, p) for n, p in module.named_parameters(recurse=merge) if id(p) not in seen]
        seen.update(id(p) for _, p in params)
        gathered = (deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
                    if zero3 and params else contextlib.nullcontext())
        with gathered:
            values = {name: _value(p, dtype) for name, p in params}
            if merge:
                values = _merged(module, values, dtype)
            for name, value in values.items():
                yield f"{prefix}.{name}" if prefix else name, value.detach()
        for name, buf in _persistent_buffers(module):
            yield f"{prefix}.{name}" if prefix else name, buf.detach()


def _value(p: torch.nn.Parameter, dtype: torch.dtype) -> torch.Tensor:
    """The parameter in ``dtype``: itself if it has that dtype, else its fp32 master cast (the parameter
    when there is none: frozen, or no ZeRO optimizer). Collective under ZeRO-3 (the master is gathered)."""
    from deepspeed.utils import safe_get_full_fp32_param

    if p.dtype == dtype:
        return p
    master = safe_get_full_fp32_param(p)
    return (p if master is None else master).to(dtype)


def _merged(layer, values: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A LoRA layer's base weight (and bias) with every active adapter's delta added, base names."""
    out = {}
    for name, value in values.items():
        if name.startswith("base_layer."):
            out[name.removeprefix("base_layer.")] = value
    delta = 0
    for adapter in layer.active_adapters:
        if getattr(layer, "use_dora", {}).get(adapter):
            raise ExportError(f"merging a DoRA adapter ({adapter}) is not supported; export the adapter directory")
        a = values[f"lora_A.{adapter}.weight"].float()
        b = values[f"lora_B.{adapter}.weight"].float()
        d = b @ a
        delta = delta + (d.T if layer.fan_in_fan_out else d) * layer.scaling[adapter]
    out["weight"] = (out["weight"].float() + delta).to(dtype)
    return out


def save_pretrained(engine, path: str, tokenizer=None, dtype: torch.dtype | str | None = None,
                    max_shard_size: int | str = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                    merge_lora: bool = False) -> str | None:
    """Writes the engine's model as a Hugging Face directory at ``path`` (see the module docstring); a
    PEFT model's adapter directory (``PeftModel.from_pretrained``), or with ``merge_lora`` the full model
    with the adapters merged (:func:`full_tensors`). Collective: call on every rank; rank 0
    writes. Returns ``path`` (on every rank)."""
    from deepspeed.pipe import PipelineModule

    from ds_chunkflow.deepspeed.distributed import agree_on_errors
    from ds_chunkflow.hf.model import base_model_of, is_peft_model

    model = engine.module
    if isinstance(model, PipelineModule):
        raise ExportError("save_pretrained: a pipeline-parallel model (PipelineModule) is not exported yet; train "
                          "the data-parallel engine, or gather the stages' checkpoints yourself")
    zero3 = engine.zero_optimization_stage() == 3
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype or next(model.parameters()).dtype
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp, error = None, None
    if rank == 0:
        try:
            tmp = prepare_target(path, overwrite)
        except ExportError as e:
            error = e
    agree_on_errors(error, device=engine.device)
    mark = {"global_step": int(engine.global_steps), "source": "training"}
    if is_peft_model(model) and not merge_lora:  # the adapter directory (gathered under ZeRO-3)
        from ds_chunkflow.hf.lora import save_adapter

        save_adapter(model, tmp or "", rank=rank)
        if rank == 0:
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, MARK), "w") as f:
                json.dump({**mark, "adapter": True}, f, indent=1)
    else:
        writer = ShardWriter(tmp, parse_size(max_shard_size)) if rank == 0 else None
        for name, tensor in full_tensors(model, dtype, zero3):
            if writer is not None:
                writer.add(name, tensor)
        if rank == 0:
            writer.close()
            inner = base_model_of(model)
            write_metadata(tmp, inner.config, dtype, getattr(inner, "generation_config", None), tokenizer, mark=mark)
    if rank == 0:
        publish(tmp, path)
    if dist.is_initialized():
        dist.barrier()
    return path


def save_hf_metadata(tag_dir: str, model, tokenizer=None) -> None:
    """What an offline export needs besides the weights, into a checkpoint tag (rank 0): the config,
    the generation config and the tokenizer, under ``<tag>/hf_model``."""
    config = getattr(model, "hf_config", None) or model.config
    directory = os.path.join(tag_dir, HF_META)
    tmp = tempfile.mkdtemp(prefix=f".{HF_META}.tmp-", dir=tag_dir)
    write_metadata(tmp, config, getattr(config, "dtype", None) or torch.float32,
                   getattr(model, "generation_config", None), tokenizer)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


# ----------------------------------------------------------------------------- offline
def _model_states(tag_dir: str) -> dict:
    files = sorted(glob.glob(os.path.join(tag_dir, "*mp_rank_00_model_states.pt")))
    if not files:
        if glob.glob(os.path.join(tag_dir, "layer_*-model_states.pt")):
            raise ExportError(f"{tag_dir}: a pipeline-parallel checkpoint (layer_*-model_states.pt) is not "
                              "convertible yet")
        raise ExportError(f"{tag_dir}: no *mp_rank_00_model_states.pt: not a DeepSpeed checkpoint tag")
    return torch.load(files[0], map_location="cpu", weights_only=False)


def _training_dtype(ds_config: dict) -> torch.dtype:
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if (ds_config.get(key) or {}).get("enabled"):
            return dtype
    return torch.float32


def checkpoint_state_dict(checkpoint_dir: str, tag: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The fp32 weights of a complete tag (DeepSpeed's ``zero_to_fp32`` for ZeRO 1-3; the module's own
    state for ZeRO-0 without an fp32 optimizer copy), tied weights once; and the run's ds_config."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = os.path.join(checkpoint_dir, tag)
    states = _model_states(tag_dir)
    ds_config = states.get("ds_config") or {}
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    has_master = stage > 0 or _training_dtype(ds_config) != torch.float32  # an fp32 copy in the optimizer files
    if has_master and glob.glob(os.path.join(tag_dir, "*optim_states.pt")):
        state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    else:
        state = {k: v.float() for k, v in states["module"].items()}
    unique, seen = {}, set()
    for name, tensor in state.items():  # zero_to_fp32 adds tied names as aliases of one tensor
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique[name] = tensor
    return unique, ds_config


def export_checkpoint(checkpoint_dir: str, out_dir: str, tag: str | None = None, dtype: torch.dtype | str | None = None,
                      config_dir: str | None = None, max_shard_size: int | str = DEFAULT_SHARD_BYTES,
                      overwrite: bool = False) -> str:
    """A complete checkpoint of ours (ZeRO 0-3, data-parallel engine) -> a Hugging Face directory,
    offline: no GPU, no process group. ``tag``: default the one a resume would load. ``config_dir``:
    config / tokenizer (default: ``<tag>/hf_model``, written by every ChunkFlow save)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from ds_chunkflow.deepspeed.checkpoint import resolve_tag

    resolved = resolve_tag(checkpoint_dir, tag)
    config_dir = config_dir or os.path.join(checkpoint_dir, resolved.tag, HF_META)
    if not os.path.isfile(os.path.join(config_dir, "config.json")):
        raise ExportError(f"{config_dir}: no config.json; pass --config DIR (the model's Hugging Face directory)")
    state, ds_config = checkpoint_state_dict(checkpoint_dir, resolved.tag)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype or _training_dtype(ds_config)
    config = AutoConfig.from_pretrained(config_dir)
    generation = None
    if os.path.isfile(os.path.join(config_dir, "generation_config.json")):
        generation = GenerationConfig.from_pretrained(config_dir)
    tokenizer = None
    if os.path.isfile(os.path.join(config_dir, "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(config_dir)
    tmp = prepare_target(out_dir, overwrite)
    writer = ShardWriter(tmp, parse_size(max_shard_size))
    for name, tensor in state.items():
        writer.add(name, tensor.to(dtype))
    writer.close()
    write_metadata(tmp, config, dtype, generation, tokenizer,
                   mark={"global_step": resolved.step, "source": f"checkpoint {checkpoint_dir} tag {resolved.tag}"})
    publish(tmp, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ds_chunkflow.hf.export",
                                     description="Convert a complete ds_chunkflow checkpoint into a Hugging Face "
                                                 "model directory (offline: no GPU, no process group).")
    parser.add_argument("checkpoint_dir", help="the directory holding the tags (the run's --output_dir)")
    parser.add_argument("out_dir", help="the Hugging Face directory to write")
    parser.add_argument("--tag", default=None, help="default: the tag a resume would load (latest complete)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: the training dtype; float32: the fp32 master weights")
    parser.add_argument("--config", default=None, help="config/tokenizer directory (default: <tag>/hf_model)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an out_dir that is not an export of ours")
    args = parser.parse_args(argv)
    from ds_chunkflow.deepspeed.checkpoint import CheckpointError

    try:
        out = export_checkpoint(args.checkpoint_dir, args.out_dir, tag=args.tag, dtype=args.dtype,
                                config_dir=args.config, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (ExportError, CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"exported {args.checkpoint_dir} -> {out}")


if __name__ == "__main__":
    main()
