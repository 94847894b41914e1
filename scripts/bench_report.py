"""benchmarks/README.md from benchmarks/results/*.json: one section per JSON file (used by gen_docs.py).

A section is its title, the command that wrote the JSON, an introduction (what is compared and how;
it may carry no figure: a number standing on its own is allowed only inside `code`), and the JSON itself rendered as
tables: scalars and nested dicts as key / value lists, lists of records as tables (one column per
scalar field; per-step lists are left out), dicts of records as tables with one row per key. So every
number in the report is one of the JSON's. A result file without a spec here still gets a section.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Spec:
    file: str
    title: str
    intro: str = ""
    command: str = ""
    omit: tuple = field(default_factory=tuple)
    pivot: tuple = ()  # (list key, column field, row field): one row per (measure, row value), columns by value


SPECS = [
    Spec("memory_realistic.json", "Exact step: activation memory and speed vs. sequence length", """
One sequence of `L` tokens, one forward and backward, float32, one thread, each point in a fresh
process. **full**: `model(input_ids, labels=...)` with transformers' own `sdpa` attention and its
own loss (float32 logits of all rows). **full+ckpt**: the same with
`gradient_checkpointing_enable(use_reentrant=False)`. **chunkflow K**: `chunked_step` with the same
CPU flash kernel per key block (state prefix + own causal block, merged by log-sum-exp), the loss on
target rows only, in checkpointed pieces. Activations are the bytes autograd holds (saved-tensor
hooks, peak of the warm-up step), K/V state reported apart. Speed: median of unmetered steps after
the warm-up, by the process's CPU time (`tokens_per_cpu_s`, the figure to read on a shared machine)
and by wall clock. Recompute fraction: `1 - L / (tokens through the first decoder layer's MLP)`.
In `summary`, `k1_*` compares ChunkFlow `K=1` with full+ckpt and `kN_*` ChunkFlow `K=N` with full.""",
         pivot=("rows", "multiple", "system")),
    Spec("memory.json", "Exact step at the old, tiny shapes", """
The same benchmark at tiny shapes, where per-chunk overhead still shows (a chunk is a few
milliseconds of math). `complete: False`: the run was stopped before the last multiple.""",
         pivot=("rows", "multiple", "system")),
    Spec("engine.json", "The engine: ChunkFlowEngine vs. plain DeepSpeed", """
Two gloo ranks, `ZeRO-2`, fp32, AdamW, global batches of chats from `examples/data/sample_sft.jsonl`.
Every system computes the same loss (sum of CE over the global label count; `max_loss_diff`).
Baselines: **padded**: plain DeepSpeed with micro-batches padded to their longest; **packed**:
fixed-length rows (BFD, row = longest sample) + full activation checkpointing, with transformers'
block-diagonal SDPA mask; **packed_varlen**: the same with per-sample attention (what flash-attn
varlen / Megatron THD do on GPUs). `chunkflow_sp` adds `sequence_parallel.max_size: 2`;
`chunkflow_k4` and `chunkflow_sp_k4` use `keep_chunks: 4`.
`dominant_step_tokens_per_s` is the step holding the longest sample; `imb_cpu` is max / mean CPU
time over the ranks. Only ratios from one run compare.""", omit=("model_dir",)),
    Spec("ab_chunkflow_sp_k4.json", "Filling the ZeRO-2 waits: A/B against the commit before", """
`chunkflow_sp_k4` of the engine benchmark run alternately in a worktree of `--base` (standalone chunks
joined K per backward) and in this checkout (`join_at_barriers`: joined to fill the other ranks' segments
between backwards). The machine's speed drifts between runs by more than the effect, so the figure
compared is `self_eff`: the system's tokens/s over twice its own per-core rate in the same run (the share of
each rank's wall time spent on its own work). `heavy_step_eff` is the same for the two steps holding the
long samples.""", command="python benchmarks/bench_ab.py --base 95e21dd --system chunkflow_sp_k4 --runs 3",
         omit=("cpu_s",)),
    Spec("peers.json", "Against the tools users would pick instead (TRL SFTTrainer, HF Trainer)", """
The same tiny random Qwen2 (saved, loaded by every system with `from_pretrained`, SDPA) on the same
data as `bench_engine.py`, two gloo ranks, DeepSpeed `ZeRO-2`, fp32, AdamW. TRL and Trainer run
through their own DeepSpeed integration (`TrainingArguments(deepspeed=ds_config)`).
**trainer_padded**: HF `Trainer` with `DataCollatorForSeq2Seq`, one sample per micro-batch and
gradient accumulation (a larger micro-batch pads the longest sample's partners to its length).
**trl_padding_free**: TRL `SFTTrainer(padding_free=True)` (on CPU transformers turns the restarting
position_ids into a block-diagonal SDPA mask: exact, but each packed row costs `row_len^2`).
**trl_bfd**: `SFTTrainer(packing=True, packing_strategy="bfd")`, which packs the whole dataset and
so trains the same samples in other steps (`tokens_trained_extra`: a row accelerate's
`even_batches` repeats). Trainer and TRL normalise by `num_items_in_batch` times the world size,
i.e. the same sum CE / global label tokens as ChunkFlow (`max_loss_diff`). `tokens_per_cpu_s` is
the sturdier figure under load. Needs `pip install -e ".[bench]"`.""", omit=("model_dir",)),
    Spec("zero3_big.json", "ZeRO-3 at a real vocabulary: memory, throughput, parameter gathers", """
Two gloo ranks, `ZeRO-3`, fp32, AdamW; a Qwen2 with Qwen2.5's vocabulary (untied, most parameters
in embedding and head), loaded by every system with `ds_chunkflow.load_pretrained` (partitioned at
load). Each global batch holds chats from the sample data plus one synthetic long sample (the heavy
tail). The baselines' peak is that sample's full `[tokens, vocab]` logits and cross-entropy on one
rank; ChunkFlow's follows `chunk_size` and `loss_piece_tokens`. The price is parameter traffic: every
chunk forward and backward gathers the layers again (`gathers_per_step`, `gather_mib_per_step`);
fewer, larger chunks cut the gathers per token.""", omit=("model_dir",)),
    Spec("loss_memory.json", "Loss at a real vocabulary, and recompute inside a chunk", """
Single process. **loss**: one chunk of a Qwen2 with Qwen2.5's vocabulary: the full logits and CE
against the chunked loss (pieces of `loss_piece_tokens` target rows, each under a checkpoint, so its
logits are computed again in backward). **recompute**: `recompute_layers` none / every second
layer / all, on top of `K=1`'s chunk recompute."""),
    Spec("lora.json", "LoRA vs full fine-tuning", """
Two ranks, AdamW, the same global batches of chats for both systems; LoRA on every decoder Linear.
Peak RSS per rank is the process's whole footprint (Python, torch and DeepSpeed included), so the
ratio understates the saving on the model's own state."""),
    Spec("chunking.json", "Chunk construction, packing, data-parallel balance", """
**packing**: efficiency = real tokens / computed token slots for ChunkFlow (`build_chunks`: every
chunk a slot of `chunk_size`), padding each micro-batch of `B` samples to its longest, and packing
without splitting (TRL-style BFD into bins as long as the longest sample: high efficiency, but every
call is then that long), on the tokenised sample data and a synthetic LMSysChat-like set.
`lower_bound` is `ceil(tokens / C)`. **balance**: data-parallel imbalance (max per-rank modelled cost
over the compute-only mean, mean and worst over batches) by sample count, ChunkFlow with groups
kept whole (`cost_bound_mean`: the bound for whole groups), and with sequence parallelism (a group
spread over up to all ranks, its all-to-all counted at weight `a2a` against the compute-only mean,
so it shows as imbalance). Packed chunks are not spread, so when a rank's share is less than one
packed chunk the imbalance stays above the goal.""", command="python benchmarks/bench_chunking.py"),
    Spec("pipeline_bubbles.json", "Pipeline bubbles (simulated)", """
The pipeline plan timed by the simulator (`ds_chunkflow.plan.simulate`, forward = tokens, backward
twice that; with `attention` the attended pairs count too). **paper_example**: the paper's
four-stage examples against its figures. **heavy_tailed**: LMSysChat-like batches with a long tail:
plain `1F1B` over the sequences against ChunkFlow's state-aware `1F1B` at several `K`
(`+search`: a local search over the order).""", command="python benchmarks/bench_pipeline_bubbles.py"),
    Spec("pipeline_run.json", "Pipeline parallelism, measured", """
Two stages on two gloo ranks, `ZeRO-1`: ChunkFlow's pipeline (chunks are the micro-batches) against
DeepSpeed's own `TrainSchedule` over padded micro-batches (same losses: `max_loss_diff`).
`slots_per_real`: computed / real tokens; `idle_s0` / `idle_s1`: idle share per stage;
`sim_bubble`: the simulator's bubble for the same plan."""),
    Spec("startup.json", "Data loading: start-up time and memory", """
`load_sft_data` on generated multi-turn chats, all with the same tokenizer and marked template:
the old in-memory loader (one Python loop) on a subset, render + tokenise alone (the floor every
loader pays), the cached loader cold with one and with several map processes, and warm. `ranks`:
private memory per rank after loading (the samples stay in memory-mapped Arrow files, in the shared
page cache, so it does not grow with the data or the rank count). The machine's cores were shared
with other jobs (`load_average_1_5_15_min`)."""),
    Spec("export.json", "Export to Hugging Face format under ZeRO-3", """
A Qwen2 exported by `ds_chunkflow.save_pretrained` under `ZeRO-3` on two CPU ranks: parameters are
gathered one module at a time, so the RSS growth during the export is the largest modules plus one
pending shard, not the whole model. Also the chunked evaluation against a plain forward of the same
weights (`eval_relative_difference`)."""),
    Spec("family_matrix.json", "Model families: exact or refused", """
Every family of the test matrix in float64, chunked against the plain full-sequence reference
(max relative error of loss and gradients, per `K`), or the guard's refusal. See
[the families page](../docs/families.md).""", command="python scripts/family_matrix.py"),
    Spec("longest.json", "The longest sample per memory budget", """
For each system, the longest single sample that trains one step on two gloo ranks (`ZeRO-2`, the
`bench_peers.py` model) with the peak RSS rise over start-up within the budget: doubling, then
bisection, each trial a fresh pair of processes, killed at `trial_timeout`. **chunkflow** (`K = 1`),
**chunkflow_sp** (`sequence_parallel.max_size: 2`, `longer_chunks: false`: each rank computes half a chunk
per call; measured before `longer_chunks` existed, which is that behaviour), **alst** (DeepSpeed's
Ulysses SP for HF + TiledMLP + tiled logits and loss, `benchmarks/peer_alst.py`), **trl_gc** (TRL
padding-free with gradient checkpointing), **deepspeed_gc** (plain DeepSpeed with gradient checkpointing). `pred_*`: the
autotuner's prediction for ChunkFlow; `extrap_*`: a straight-line extrapolation (memory per token) to
the budgets the search could not reach in time (`capped`). See [the note](../docs/longest.md).""",
         command="python benchmarks/bench_longest.py --systems alst,chunkflow,chunkflow_sp,deepspeed_gc,trl_gc "
                 "--budgets_gib 0.125,1,2 --start 8192 --bisect 1 --trial_timeout 150 --search_cap 900, then "
                 "--append --systems alst,chunkflow,chunkflow_sp --budgets_gib 0.125 --bisect 2 --search_cap 750",
         omit=("trials",)),
    Spec("longest_sp_longer.json", "The longest sample with sequence parallelism's default longer chunks", """
`chunkflow_sp` of the table above with `sequence_parallel.longer_chunks: true`, the engine's default: a
spread sample runs in chunks of `2 x chunk_size`, each rank computing `chunk_size` rows per call (fewer
calls, faster; about one chunk's activations per call more than `false`).""",
         command="python benchmarks/bench_longest.py --systems chunkflow_sp --budgets_gib 0.125 --start 16384 "
                 "--bisect 2 --trial_timeout 150 --search_cap 200 --sp_longer_chunks --out longest_sp_longer.json",
         omit=("trials",)),
    Spec("peers_alst.json", "DeepSpeed ALST as a peer", """
`bench_peers.py` with DeepSpeed's long-sequence recipe (Ulysses sequence parallelism over both ranks,
TiledMLP, tiled logits + loss), checked against a plain reference by `peer_alst.py --check`, beside
ChunkFlow (`K = 1`, and with sequence parallelism and `K = 4`) and TRL padding-free on the same data,
model, optimizer and loss normalisation.""",
         command="python benchmarks/bench_peers.py --systems chunkflow,chunkflow_sp_k4,trl_padding_free,alst "
                 "--out peers_alst.json"),
    Spec("syncs.json", "Device reads per training step", """
The calls that make the host wait for the device on a GPU (`item`, `tolist`, `cpu`, `nonzero`,
`bool/int/float(tensor)`) inside one `train_batch` on the first rank (two ranks, `ZeRO-2`, sequence
parallelism, a packed batch and a long sample), by caller; `device_reads` leaves out the callers that
read host tensors by design (`host_callers`).""", command="python benchmarks/count_syncs.py"),
    Spec("syncs_before.json", "Device reads per training step, before the chunk runtime (c8c88ed)", """
The same count for the checkout before the chunk runtime kept the loss on the device (one loss read and
one `nonzero` per chunk).""",
         command="python benchmarks/count_syncs.py --repo <checkout of c8c88ed> --name before "
                 "--host_callers batch.py:num_targets"),
    Spec("engine_before.json", "The engine before the one-runtime redesign (c8c88ed), for comparison", """
`bench_engine.py` with the ChunkFlow systems only, run in a checkout of the commit before the
redesign, back to back with the next section on the same idle machine.""",
         command="python benchmarks/bench_engine.py --systems chunkflow,chunkflow_sp --out engine_before.json "
                 "(in a checkout of c8c88ed)", omit=("model_dir",)),
    Spec("engine_after.json", "The engine after the one-runtime redesign, for comparison", """
The same command in this checkout, right after the previous section's run.""",
         command="python benchmarks/bench_engine.py --systems chunkflow,chunkflow_sp --out engine_after.json",
         omit=("model_dir",)),
    Spec("kill_stress.json", "Kill and resume", """
The example (two ranks, `ZeRO-3`) killed at seeded random moments and resumed; `bitwise`: the final
loss is identical to the uninterrupted run's.""",
         command="python scripts/kill_stress.py --budget 180 --steps 8 --seed 2"),
]

HEADER = """# Benchmarks

Generated by `python scripts/gen_docs.py` from `benchmarks/results/*.json`; do not edit by hand.
Every figure comes from one run of a script in `benchmarks/` (or `scripts/`) on this repository's CI
machine (CPU only, shared with other jobs; the environment of each run is in its JSON), saved as
JSON (and PNG) in `benchmarks/results/`. Ratios are against baselines measured in the same run. Tiny
random models: the absolute numbers say nothing about GPUs; the ratios and the memory shapes are the
point. GPU results, once `scripts/gpu_check.sh` has run, land in `benchmarks/results/gpu/`.
"""


def fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _is_scalar(v) -> bool:
    return not isinstance(v, (dict, list)) or (isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v)
                                                 and len(v) <= 12)


def _flatten(d: dict, prefix="") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.extend(_flatten(v, f"{prefix}{k}."))
        elif _is_scalar(v):
            out.append((prefix + str(k), v))
    return out


def _kv(pairs) -> list[str]:
    return ["; ".join(f"`{k}`: {fmt(v)}" for k, v in pairs), ""]


def _table(records: list[dict], label: str = "") -> list[str]:
    cols = []
    for r in records:
        for k, v in r.items():
            if k not in cols and not isinstance(v, (dict, list)):
                cols.append(k)
    head = ([label] if label else []) + cols
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = ([fmt(r.get("_key"))] if label else []) + [fmt(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _pivot(records: list[dict], column: str, row: str) -> list[str]:
    """A long table turned wide: one line per (measure, row value), one column per column value."""
    values = list(dict.fromkeys(r[column] for r in records))
    keys = list(dict.fromkeys(r[row] for r in records))
    measures = [k for k, v in records[0].items()
                if k not in (column, row) and isinstance(v, (int, float)) and not isinstance(v, bool)]
    cell = {(r[row], r[column]): r for r in records}
    lines = [f"| measure, {row} | " + " | ".join(f"{column} {v}" for v in values) + " |",
             "|" + "---|" * (len(values) + 1)]
    for m in measures:
        for k in keys:
            cells = [fmt(cell[(k, v)].get(m)) if (k, v) in cell else "" for v in values]
            lines.append(f"| {m}, {k} | " + " | ".join(cells) + " |")
    return lines + [""]


def render(data, omit=(), pivot=()) -> list[str]:
    if isinstance(data, list):
        return _table(data) if all(isinstance(r, dict) for r in data) else _kv([("values", data)])
    lines, settings = [], []
    for key, value in data.items():
        if key in omit or key in ("environment", "command"):
            continue
        if pivot and key == pivot[0]:
            lines += [f"**{key}**", ""] + _pivot(value, pivot[1], pivot[2])
        elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            lines += [f"**{key}**", ""] + _table(value)
        elif isinstance(value, dict) and key not in ("config", "model", "data") \
                and sum(isinstance(v, dict) for v in value.values()) >= 2:
            subs = {k: v for k, v in value.items() if isinstance(v, dict)}
            rest = [(k, v) for k, v in value.items() if k not in subs and _is_scalar(v)]
            lines += [f"**{key}**" + (": " + _kv(rest)[0] if rest else ""), ""]
            lines += _table([{"_key": k, **v} for k, v in subs.items()], label=key)
        elif isinstance(value, dict):
            pairs = [(k, v) for k, v in _flatten(value) if k.split(".")[-1] not in omit]
            scalars = [(k, v) for k, v in pairs]
            if scalars:
                lines += [f"**{key}**: " + _kv(scalars)[0], ""]
        elif _is_scalar(value):
            settings.append((key, value))
    return (_kv(settings) if settings else []) + lines


def _environment(data) -> str:
    env = data.get("environment") if isinstance(data, dict) else None
    if not env:
        return ""
    keep = [(k, v) for k, v in env.items() if k != "command"]
    return "Environment: " + ", ".join(f"{k} {v}" for k, v in keep) + "."


def section(spec: Spec, results: Path) -> list[str]:
    data = json.loads((results / spec.file).read_text())
    env = data.get("environment", {}) if isinstance(data, dict) else {}
    command = spec.command or env.get("command") or f"python benchmarks/bench_{Path(spec.file).stem}.py"
    intro = " ".join(spec.intro.split())
    prose = re.sub(r"`[^`]*`|\([^)]*\.md\)", "", intro)
    if re.search(r"(?<![\w.-])\d", prose):
        raise ValueError(f"{spec.file}: the introduction carries a figure outside `code`: {prose!r}")
    lines = [f"## {spec.title}", "", f"`{command}` → `benchmarks/results/{spec.file}`", ""]
    if intro:
        lines += [intro, ""]
    if _environment(data):
        lines += [_environment(data), ""]
    lines += render(data, spec.omit, spec.pivot)
    png = results / (Path(spec.file).stem + ".png")
    if png.exists():
        lines += [f"![{spec.title}](results/{png.name})", ""]
    return lines


def benchmark_report(results: Path) -> str:
    specs = {s.file: s for s in SPECS}
    files = sorted(p.name for p in results.glob("*.json"))
    ordered = [s.file for s in SPECS if s.file in files] + [f for f in files if f not in specs]
    lines = [HEADER, "Contents: " + ", ".join(
        f"[{specs.get(f, Spec(f, Path(f).stem)).title}](#{slug(specs.get(f, Spec(f, Path(f).stem)).title)})"
        for f in ordered), ""]
    for f in ordered:
        lines += section(specs.get(f, Spec(f, Path(f).stem)), results)
    return "\n".join(lines).rstrip() + "\n"


def slug(title: str) -> str:
    """GitHub's heading anchor."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
