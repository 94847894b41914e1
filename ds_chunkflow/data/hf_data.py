"""SFT data through Hugging Face ``datasets``: tokenised once per node, cached on disk, memory-mapped.

:func:`load_sft_data` reads local JSONL (``.jsonl``, or ``.json`` holding JSON lines), a JSON
array (``.json``), Parquet (``.parquet``) or a ``save_to_disk`` directory, and gives the samples
of :func:`ds_chunkflow.data.jsonl.load_jsonl` (same shapes, checks, order of checks, error messages
and ``LoadStats``), as an :class:`ArrowSFTDataset`::

    file ──rows──> datasets.map(batched, num_proc, progress bar) ──> <cache_dir>/<key>/*.arrow
                   (parse, check, render, tokenise, label: one row out per row in, good or bad;
                    an expanded chat: one row per sample, each with its line)
    every rank:    Dataset.from_file(...) memory-mapped; lengths / loss counts as numpy arrays

* Rows keep their place: row ``r`` is line ``r + 1`` of a JSONL file (blank lines included, so
  errors name the file's 1-based line) or the ``r + 1``-th record of the other formats (errors
  read ``path:<record>``); each output row carries its ``line``, so the samples of a chat expanded
  per assistant turn (``non_prefix_stable="expand"``) name the line they came from. A bad row
  becomes a row with a ``reason`` and a ``problem``; after the map the loader raises
  :class:`~ds_chunkflow.data.jsonl.DataError` for the first bad row whose policy is ``"error"``
  (``on_overlong`` for over-long samples, ``on_error`` for the rest), or skips and counts them by
  reason (``stats.skipped``, logged once). Nothing is dropped silently.
* JSONL lines are split on ``b"\\n"`` and parsed by ``json`` here (not by pyarrow, which would stop
  at the first bad line without naming it, and not by ``str.splitlines``, which also splits on
  U+2028 inside a JSON string).
* Cache: ``<cache_dir>/<key>/`` where ``key`` hashes the file's path, size and mtime (every file of
  a directory), the tokenizer (its ``tokenizer.json``, chat template, special tokens), the options
  that change samples (``max_seq_len``, ``on_overlong``, ``vocab_size``, ``assistant_turns``,
  ``non_prefix_stable``) and
  a format version. It is written to a temporary directory and renamed into place when complete,
  so a killed build leaves no cache that looks valid. ``on_error`` is applied when loading, so
  switching it reuses the cache. A second run loads from the cache without tokenising.
* Once per node: with ``torch.distributed`` initialised, local rank 0 (``LOCAL_RANK``; rank 0
  when unset) builds the cache, all ranks meet (an ``all_gather_object`` of the build error, which
  is the barrier), then every rank memory-maps it. A build error on one rank is raised on every
  rank (a ``DataError`` as itself); a bad line is found by every rank in the same cached columns.
  Per rank, memory holds the Arrow mapping plus ``8 bytes * rows`` per numpy column, never the
  samples as Python objects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from ds_chunkflow.constants import IGNORE_INDEX
from ds_chunkflow.data.chat_labels import AssistantTurns, NonPrefixStable
from ds_chunkflow.data.jsonl import (
    BAD_FIELD,
    MALFORMED_JSON,
    NO_SAMPLES,
    OVERLONG,
    DataError,
    LineEncoder,
    LoadStats,
    OnError,
    OnOverlong,
    _Bad,
    check_arguments,
    parse_json_line,
)
from ds_chunkflow.data.sampler import _is_positive_int

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Bumped when what the map writes changes, so old caches are not read."""
BLANK = "blank"  # a blank JSONL line (counted, not skipped)
_META = "ds_chunkflow_cache.json"
_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "length": datasets.Value("int64"),
    "num_loss_tokens": datasets.Value("int64"),
    "truncated": datasets.Value("bool"),
    "reason": datasets.Value("string"),
    "problem": datasets.Value("string"),
    "line": datasets.Value("int64"),
    "expanded": datasets.Value("bool"),
})


class ArrowSFTDataset:
    """Memory-mapped samples: ``ds[i] == {"input_ids": LongTensor, "labels": LongTensor}`` (like SFTDataset)."""

    def __init__(self, table: datasets.Dataset, rows: np.ndarray, stats: LoadStats, line_numbers: np.ndarray) -> None:
        self._table = table.with_format("numpy", columns=["input_ids", "labels"])
        self._rows = rows
        self.stats = stats
        self.line_numbers = line_numbers
        """1-based line (JSONL) or record (other formats) of each sample."""
        self.lengths: np.ndarray = _column(table, "length")[rows]
        self._num_loss = _column(table, "num_loss_tokens")[rows]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self._table[int(self._rows[index])]
        return {k: torch.from_numpy(row[k].astype(np.int64)) for k in ("input_ids", "labels")}

    def num_loss_tokens(self, indices: Iterable[int] | None = None) -> int:
        """Loss tokens (targets) over ``indices`` (default: all samples)."""
        if indices is None:
            return int(self._num_loss.sum())
        return int(self._num_loss[np.fromiter(indices, dtype=np.int64)].sum())


def _column(table: datasets.Dataset, name: str) -> np.ndarray:
    return table.data.column(name).to_numpy()


class _EncodeBatch:
    """The map function: a batch of rows -> the same number of encoded rows (good or bad)."""

    def __init__(self, encode: LineEncoder, jsonl: bool) -> None:
        self.encode, self.jsonl = encode, jsonl

    def _obj(self, batch: dict[str, list], j: int) -> dict[str, Any] | None:
        if self.jsonl:
            raw = batch["raw"][j]
            return None if not raw.strip() else parse_json_line(raw)
        # Arrow rows: keys absent from a record are None after schema unification
        obj = {k: v[j] for k, v in batch.items() if v[j] is not None}
        if isinstance(obj.get("messages"), list):
            obj["messages"] = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
                               for m in obj["messages"]]
        return obj

    def __call__(self, batch: dict[str, list], indices: list[int]) -> pa.Table:
        ids_out, labels_out, truncated_out, reasons, problems, lines, expanded = [], [], [], [], [], [], []
        empty = np.zeros(0, dtype=np.int64)
        for j, index in enumerate(indices):
            samples = [(empty, empty, False)]
            reason, problem = "", ""
            try:
                obj = self._obj(batch, j)
                if obj is None:
                    reason = BLANK
                else:
                    samples = self.encode(obj)
            except _Bad as bad:
                reason, problem = bad.reason, bad.problem
            for ids, labels, truncated in samples:
                ids_out.append(ids)
                labels_out.append(labels)
                truncated_out.append(bool(truncated))
                reasons.append(reason)
                problems.append(problem)
                lines.append(index + 1)
                expanded.append(len(samples) > 1)
        # One Arrow table per batch from concatenated arrays: no per-token Python objects on the way to disk
        lengths = np.fromiter((len(x) for x in ids_out), dtype=np.int64, count=len(ids_out))
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        flat_labels = np.concatenate(labels_out).astype(np.int32)
        starts = offsets.to_numpy()[:-1]
        targets = flat_labels != IGNORE_INDEX  # labels[0] of each sample is never a target
        targets[starts[lengths > 0]] = False
        cumulative = np.concatenate([[0], np.cumsum(targets, dtype=np.int64)])
        num_loss = cumulative[starts + lengths] - cumulative[starts]
        return pa.table({
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(ids_out).astype(np.int32))),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(flat_labels)),
            "length": pa.array(lengths), "num_loss_tokens": pa.array(num_loss.astype(np.int64)),
            "truncated": pa.array(truncated_out, pa.bool_()), "reason": pa.array(reasons, pa.string()),
            "problem": pa.array(problems, pa.string()), "line": pa.array(lines, pa.int64()),
            "expanded": pa.array(expanded, pa.bool_())})


def _jsonl_rows(path: str) -> Iterator[dict[str, bytes]]:
    with open(path, "rb") as f:
        for raw in f:  # splits on b"\n" only
            yield {"raw": raw}


def _is_jsonl(path: str) -> bool:
    if path.endswith(".jsonl"):
        return True
    with open(path, "rb") as f:  # .json: a JSON array starts with '[', JSON lines with '{'
        head = f.read(4096).lstrip()
    return not head.startswith(b"[")


def _read_rows(path: str, tmp: str) -> tuple[datasets.Dataset, bool]:
    """The raw rows of ``path`` (written under ``tmp``) and whether they are JSONL lines."""
    try:
        if os.path.isdir(path):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                raise DataError(path, None, BAD_FIELD, f"a DatasetDict ({list(ds)}); pass one split's directory")
            return ds, False
        if path.endswith((".jsonl", ".json")) and _is_jsonl(path):
            features = datasets.Features({"raw": datasets.Value("binary")})
            return datasets.Dataset.from_generator(_jsonl_rows, features=features, gen_kwargs={"path": path},
                                                   cache_dir=tmp), True
        if path.endswith(".json"):
            return datasets.load_dataset("json", data_files=path, split="train", cache_dir=tmp), False
        if path.endswith(".parquet"):
            return datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=tmp), False
    except DataError:
        raise
    except Exception as e:  # pyarrow cannot parse the file as a whole: no line to name
        raise DataError(path, None, MALFORMED_JSON, f"cannot read the file: {type(e).__name__}: {e}") from None
    raise ValueError(f"{path}: unsupported data file; use .jsonl, .json, .parquet or a save_to_disk directory")


def _file_identity(path: str) -> list[Any]:
    files = [path] if not os.path.isdir(path) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    return [(os.path.relpath(f, path) if f != path else os.path.abspath(f), os.stat(f).st_size,
             os.stat(f).st_mtime_ns) for f in files]


def cache_key(path: str, tokenizer: PreTrainedTokenizerBase, options: dict[str, Any]) -> str:
    """Hash of everything the cached samples depend on (module docstring)."""
    backend = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else repr(tokenizer)
    blob = json.dumps({
        "version": FORMAT_VERSION, "data": _file_identity(path), "tokenizer_class": type(tokenizer).__name__,
        "tokenizer": hashlib.sha256(backend.encode()).hexdigest(), "chat_template": tokenizer.chat_template,
        "special_tokens": tokenizer.special_tokens_map, "len": len(tokenizer), "options": options,
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _build(path: str, final: str, encode: LineEncoder, num_proc: int | None, batch_size: int) -> None:
    """Tokenise ``path`` into ``final`` (atomically: a temporary directory renamed into place)."""
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=parent)
    try:
        rows, jsonl = _read_rows(path, os.path.join(tmp, "raw"))
        if num_proc is None:
            num_proc = min(8, len(os.sched_getaffinity(0))) if len(rows) >= 20_000 else 1
        out = rows.map(_EncodeBatch(encode, jsonl), batched=True, with_indices=True, batch_size=batch_size,
                       num_proc=num_proc,
                       remove_columns=rows.column_names, features=_FEATURES, new_fingerprint=os.path.basename(final),
                       cache_file_name=os.path.join(tmp, "data.arrow"), desc="ds_chunkflow: tokenising")
        files = [os.path.basename(f["filename"]) for f in out.cache_files]
        del out, rows
        shutil.rmtree(os.path.join(tmp, "raw"), ignore_errors=True)
        with open(os.path.join(tmp, _META), "w") as f:
            json.dump({"files": files, "source": path, "version": FORMAT_VERSION}, f)
        try:
            os.rename(tmp, final)
        except OSError:  # another node's rank built it first (a shared cache_dir): use theirs
            if not _complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _complete(final: str) -> bool:
    return os.path.isfile(os.path.join(final, _META))


def _build_once_per_node(build, final: str) -> None:
    """``build()`` on local rank 0 unless cached; every rank raises if it failed; the gather is the barrier."""
    if not dist.is_initialized():
        if not _complete(final):
            build()
        return
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    error: BaseException | None = None
    if local == 0 and not _complete(final):
        try:
            build()
        except Exception as e:  # noqa: BLE001  (re-raised below, on every rank)
            error = e
    mine = None if error is None else (error if isinstance(error, DataError) else f"{type(error).__name__}: {error}")
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if error is not None:
        raise error
    other = next((e for e in gathered if e is not None), None)
    if isinstance(other, DataError):
        raise other
    if other is not None:
        raise RuntimeError(f"building the data cache failed on another rank: {other}")


def _stats_and_rows(path: str, table: datasets.Dataset, on_error: OnError,
                    on_overlong: OnOverlong) -> tuple[LoadStats, np.ndarray, np.ndarray]:
    """The stats, the good rows and their lines (a bad, blank or one-sample line is one row)."""
    reasons = table.data.column("reason").to_numpy(zero_copy_only=False)
    lines = _column(table, "line")
    bad = np.flatnonzero(reasons != "")
    stats = LoadStats(path=path, num_lines=len(np.unique(lines)))
    for r in bad.tolist():
        reason, line = reasons[r], int(lines[r])
        if reason == BLANK:
            stats.num_blank_lines += 1
            continue
        policy = on_overlong if reason == OVERLONG else on_error
        if policy == "error":
            raise DataError(path, line, reason, table.data.column("problem")[r].as_py())
        stats.skipped[reason] += 1
        stats.first_skipped_line.setdefault(reason, line)
    rows = np.flatnonzero(reasons == "")
    expanded = table.data.column("expanded").to_numpy(zero_copy_only=False)[rows]
    stats.num_expanded_samples = int(expanded.sum())
    stats.num_expanded_lines = len(np.unique(lines[rows][expanded]))
    stats.skipped = Counter(dict(sorted(stats.skipped.items())))
    stats.num_samples = len(rows)
    stats.num_tokens = int(_column(table, "length")[rows].sum())
    stats.num_loss_tokens = int(_column(table, "num_loss_tokens")[rows].sum())
    stats.num_truncated = int(table.data.column("truncated").to_numpy(zero_copy_only=False)[rows].sum())
    return stats, rows, lines[rows]


def load_sft_data(
    path: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_len: int | None = None,
    on_error: OnError = "error",
    on_overlong: OnOverlong = "error",
    vocab_size: int | None = None,
    assistant_turns: AssistantTurns = "all",
    non_prefix_stable: NonPrefixStable = "expand",
    cache_dir: str | os.PathLike[str] | None = None,
    num_proc: int | None = None,
    batch_size: int = 256,
) -> ArrowSFTDataset:
    """Load SFT data through ``datasets`` (module docstring); arguments as :func:`~ds_chunkflow.data.jsonl.load_jsonl`.

    ``cache_dir``: where tokenised data is cached, shared by the ranks of a node (default
    ``$DS_CHUNKFLOW_DATA_CACHE``, else ``<HF_DATASETS_CACHE>/ds_chunkflow``). ``num_proc``: worker
    processes of the tokenising map (default: the usable CPUs, at most 8, or 1 below 20K rows).
    ``batch_size``: rows per map call.
    """
    path = os.fspath(path)
    vocab_size = check_arguments("load_sft_data", tokenizer, on_error, on_overlong, max_seq_len, vocab_size,
                                 assistant_turns, non_prefix_stable)
    if num_proc is not None and not _is_positive_int(num_proc):
        raise ValueError(f"num_proc must be a positive int or None, got {num_proc!r}")
    if not _is_positive_int(batch_size):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such data file or directory")
    cache_dir = os.fspath(cache_dir or os.environ.get("DS_CHUNKFLOW_DATA_CACHE")
                          or os.path.join(datasets.config.HF_DATASETS_CACHE, "ds_chunkflow"))
    options = {"max_seq_len": max_seq_len, "on_overlong": on_overlong, "vocab_size": vocab_size,
               "assistant_turns": assistant_turns, "non_prefix_stable": non_prefix_stable}
    final = os.path.join(cache_dir, cache_key(path, tokenizer, options))
    encode = LineEncoder(tokenizer, vocab_size, max_seq_len, on_overlong, assistant_turns, non_prefix_stable)
    _build_once_per_node(lambda: _build(path, final, encode, num_proc, batch_size), final)

    with open(os.path.join(final, _META)) as f:
        files = json.load(f)["files"]
    table = datasets.concatenate_datasets([datasets.Dataset.from_file(os.path.join(final, n)) for n in files])
    stats, rows, line_numbers = _stats_and_rows(path, table, on_error, on_overlong)
    level = logging.WARNING if stats.num_skipped or stats.num_truncated else logging.INFO
    logger.log(level, "%s (cache %s)", stats.summary(), final)
    if not len(rows):
        raise DataError(path, None, NO_SAMPLES, f"no samples ({stats.summary()})")
    return ArrowSFTDataset(table, rows, stats, line_numbers)
