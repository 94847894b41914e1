"""Generates the parts of the docs that must not be kept by hand, from their sources.

* README.md, between ``<!-- config-reference:begin -->`` / ``<!-- config-reference:end -->``: every field
  of the ``chunkflow`` section (nested ones as dotted names), its type, default and docstring, read from
  the pydantic models in ``ds_chunkflow/config.py`` (loaded from the file: no torch, no ds_chunkflow import).
* README.md, between ``<!-- figures:begin -->`` / ``<!-- figures:end -->``: the figures that matter most,
  each number taken from a JSON file of ``benchmarks/results/`` by the path its line names in a
  ``<!-- data: ... -->`` marker (``tests/test_docs.py`` recomputes them from that marker alone).
* benchmarks/README.md: the whole benchmark report, one section per ``benchmarks/results/*.json``.

    python scripts/gen_docs.py            # rewrite the generated parts
    python scripts/gen_docs.py --check    # exit 1 if any of them is out of date

A data path walks the JSON by ``::``-separated steps: a key, a list index, or ``key=value[&key=value]``
(the first list element whose fields equal those values; a value that reads as a number is compared as
one). ``rows::system=chunkflow K=1&multiple=8::activation_MiB|.0f`` is that row's activation_MiB, printed
with the format ``.0f``.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import sys
import types
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import SPECS, benchmark_report, slug  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BENCH_README = "benchmarks/README.md"


# ---------------------------------------------------------------- data paths (shared with tests/test_docs.py)

def _scalar(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def lookup(data, path: str):
    """The value at ``path`` (steps separated by ``::``) in parsed JSON ``data``."""
    for step in path.split("::"):
        if isinstance(data, list) and "=" in step:
            want = dict(cond.split("=", 1) for cond in step.split("&"))
            hits = [row for row in data if all(_scalar(v) == row.get(k) or v == str(row.get(k))
                                               for k, v in want.items())]
            if not hits:
                raise KeyError(f"no row with {want} at step {step!r} of {path!r}")
            data = hits[0]
        elif isinstance(data, list):
            data = data[int(step)]
        else:
            if step not in data:
                raise KeyError(f"no key {step!r} in {path!r} (keys: {sorted(data)[:20]})")
            data = data[step]
    return data


def render_value(value, fmt: str) -> str:
    return format(value, fmt) if fmt else str(value)


# ---------------------------------------------------------------- the config reference

def _load_config_module():
    """ds_chunkflow/config.py on its own (it imports only pydantic and the standard library)."""
    path = ROOT / "ds_chunkflow" / "config.py"
    spec = importlib.util.spec_from_file_location("_ds_chunkflow_config_for_docs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module, path.read_text()


def _attribute_docstrings(source: str) -> dict[tuple[str, str], str]:
    """(class, field) -> the string literal right after the field's annotated assignment."""
    docs = {}
    for cls in ast.walk(ast.parse(source)):
        if not isinstance(cls, ast.ClassDef):
            continue
        body = cls.body
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[(cls.name, stmt.target.id)] = " ".join(nxt.value.value.split())
    return docs


def _bounds(metadata) -> list[str]:
    out = []
    for m in metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(m, attr, None) is not None:
                out.append(f"{sym} {getattr(m, attr)}")
        out.extend(_bounds(getattr(m, "metadata", ()) or ()))
    return out


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *extra = typing.get_args(tp)
        bounds = _bounds(extra)
        return _type_name(base) + (f" ({', '.join(bounds)})" if bounds else "")
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "`null`"
    return getattr(tp, "__name__", str(tp))


def _default(field) -> str:
    if field.default_factory is not None:
        return "(section)"
    value = field.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def config_rows(model, docs, prefix=""):
    from pydantic import BaseModel

    rows = []
    for name, field in model.model_fields.items():
        key = prefix + name
        doc = docs.get((model.__name__, name), "")
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.append((key, "section", "", doc))
            rows.extend(config_rows(ann, docs, key + "."))
            continue
        typ = _type_name(ann)
        bounds = _bounds(field.metadata)
        if bounds:
            typ += f" ({', '.join(bounds)})"
        rows.append((key, typ, _default(field), doc))
    return rows


def config_reference() -> str:
    module, source = _load_config_module()
    docs = _attribute_docstrings(source)
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, doc in config_rows(module.ChunkFlowConfig, docs):
        doc = re.sub(r":\w+:`([^`]+)`", r"`\1`", re.sub(r"``([^`]+)``", r"`\1`", doc)).replace("|", "\\|")
        lines.append(f"| `{key}` | {typ} | {default} | {doc} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the README's figures

# (text with {n} placeholders, JSON file, data paths in the order of the placeholders,
#  the command that wrote the JSON: None takes the JSON's environment.command)
FIGURES = [
    ("**Activation memory follows `chunk_size`, not the sample**: at {0}x `chunk_size` one sequence's "
     "activations are {1} MiB with ChunkFlow `K=1` against {2} MiB for transformers' full forward and {3} MiB "
     "with gradient checkpointing, at {4}x checkpointing's tokens per CPU-second (recomputing {5}x as much).",
     "memory_realistic.json",
     ["config::multiples::2|d", "rows::system=chunkflow K=1&multiple=8::activation_MiB|.0f",
      "rows::system=full&multiple=8::activation_MiB|.0f", "rows::system=full+ckpt&multiple=8::activation_MiB|.0f",
      "summary::8x::k1_cpu_speed_vs_full_ckpt|.2f", "summary::8x::k1_recompute_vs_full_ckpt|.2f"],
     "python benchmarks/bench_memory.py --hidden 512 --chunk_size 1024 --multiples 2,4,8 --out memory_realistic.json"),
    ("**The engine against plain DeepSpeed** on heavy-tailed chats: {0}x the tokens/s of packed rows with "
     "varlen attention and checkpointing at {1}x its peak memory; {2}x padded micro-batches at {3}x their memory.",
     "engine.json",
     ["ratios::pair=chunkflow / packed_varlen::tokens_per_s|.2f",
      "ratios::pair=chunkflow / packed_varlen::peak_rss|.2f",
      "ratios::pair=chunkflow / padded::tokens_per_s|.1f", "ratios::pair=chunkflow / padded::peak_rss|.2f"],
     "python benchmarks/bench_engine.py"),
    ("**Against HF Trainer and TRL** on the same batches: {0}x the best peer's tokens/s at {1}x its peak "
     "memory; {2}x TRL's padding-free mode at {3}x its memory.",
     "peers.json",
     ["ratios::pair=chunkflow / trainer_padded (best peer)::tokens_per_s|.2f",
      "ratios::pair=chunkflow / trainer_padded (best peer)::peak_rss|.2f",
      "ratios::pair=chunkflow / trl_padding_free::tokens_per_s|.2f",
      "ratios::pair=chunkflow / trl_padding_free::peak_rss|.2f"],
     "python benchmarks/bench_peers.py"),
    ("**`ZeRO-3` at a real vocabulary** ({0} tokens, a {1}-token sample in the batch): {2}x the peak memory of "
     "plain DeepSpeed at {3}x its tokens/s, for {4} parameter all-gathers per step against its {5}.",
     "zero3_big.json",
     ["config::model::vocab_size|,d", "config::long_sample|,d", "ratios::pair=chunkflow / padded::peak_rss|.2f",
      "ratios::pair=chunkflow / padded::tokens_per_s|.2f", "rows::system=chunkflow::gathers_per_step|.0f",
      "rows::system=padded::gathers_per_step|.0f"],
     None),
    ("**The longest sample in a memory budget** (one training step on two ranks, peak RSS at most {0} GiB over "
     "start-up): {1} tokens with ChunkFlow, {2} with its sequence parallelism (`longer_chunks: false`), {3} with "
     "DeepSpeed's ALST "
     "(Ulysses + TiledMLP + tiled loss); TRL padding-free and plain DeepSpeed with checkpointing fail at {4}.",
     "longest.json",
     ["rows::system=chunkflow&budget_gib=0.125::budget_gib|g", "rows::system=chunkflow&budget_gib=0.125::longest|,d",
      "rows::system=chunkflow_sp&budget_gib=0.125::longest|,d", "rows::system=alst&budget_gib=0.125::longest|,d",
      "rows::system=trl_gc&budget_gib=0.125::first_miss|,d"],
     None),
    ("**Where a step goes** (the engine on heavy-tailed chats with sequence parallelism and `keep_chunks: 4`, "
     "per rank and step): {0} s backward (gradient reduction included), {1} s forward, {2} s state-only "
     "forwards and {3} s recomputes, {4} s padding calls; {5} s of it inside collectives, {6} s of that one rank "
     "waiting for the other; {7} of the machine's limit (the run's best per-core rate on both cores; {8} with "
     "`keep_chunks: 1`). The waits come from the two cores' speeds drifting apart while the spread sample keeps "
     "the ranks in step ([scaling.md](docs/scaling.md#where-the-last-6-goes)).",
     "engine.json",
     ["rows::system=chunkflow_sp_k4::time_breakdown::backward|.2f",
      "rows::system=chunkflow_sp_k4::time_breakdown::forward|.2f",
      "rows::system=chunkflow_sp_k4::time_breakdown::state_forward|.2f",
      "rows::system=chunkflow_sp_k4::time_breakdown::recompute|.2f",
      "rows::system=chunkflow_sp_k4::time_breakdown::lockstep_pad|.2f",
      "rows::system=chunkflow_sp_k4::collective_s|.2f",
      "rows::system=chunkflow_sp_k4::collective_wait_s|.2f",
      "rows::system=chunkflow_sp_k4::machine_limit_ratio|.2f",
      "rows::system=chunkflow_sp::machine_limit_ratio|.2f"],
     "python benchmarks/bench_engine.py"),
    ("**Filling the ZeRO-2 waits** (standalone chunks' backwards cut to match the other ranks' segments between "
     "backwards, against joining K at a time; the same system, interleaved runs): each rank's share of wall time "
     "on its own work {0} against {1}, mean of {2} runs each.",
     "ab_chunkflow_sp_k4.json",
     ["means::side=head::self_eff|.3f", "means::side=base::self_eff|.3f", "means::side=head::runs|d"],
     "python benchmarks/bench_ab.py --base 95e21dd --system chunkflow_sp_k4 --runs 3"),
    ("**Balance at small global batches**: {0} samples on {1} ranks, sequence parallelism on, max / mean rank "
     "cost {2} (was {3} when whole packed chunks were dealt).",
     "chunking.json",
     ["balance::method=chunkflow+SP C=4096 a2a=0.1&batch=512&ranks=64::batch|d",
      "balance::method=chunkflow+SP C=4096 a2a=0.1&batch=512&ranks=64::ranks|d",
      "balance::method=chunkflow+SP C=4096 a2a=0.1&batch=512&ranks=64::cost_mean|.3f",
      "balance::method=chunkflow+SP C=4096 a2a=0.1 packed&batch=512&ranks=64::cost_mean|.3f"],
     "python benchmarks/bench_chunking.py"),
    ("**Pipeline parallelism**: {0}x the tokens/s of DeepSpeed's own `1F1B` over padded micro-batches on "
     "{1} stages; simulated bubble {2} against {3}.",
     "pipeline_run.json",
     ["rows::system=chunkflow::speedup|.1f", "config::stages|d", "rows::system=chunkflow::sim_bubble|.1%",
      "rows::system=deepspeed::sim_bubble|.1%"],
     "python benchmarks/bench_pipeline_run.py"),
]


def figures() -> str:
    import json

    titles = {spec.file: spec.title for spec in SPECS}
    lines = []
    for text, file, paths, command in FIGURES:
        data = json.loads((RESULTS / file).read_text())
        values = []
        for p in paths:
            path, _, fmt = p.partition("|")
            values.append(render_value(lookup(data, path), fmt))
        command = command or data["environment"]["command"]
        anchor = slug(titles.get(file, file))
        lines.append(f"* {text.format(*values)} `{command}`, [report]({BENCH_README}#{anchor}) "
                     f"<!-- data: {file} ; {' ; '.join(paths)} -->")
    return "\n".join(lines)


# ---------------------------------------------------------------- writing and checking

def _between(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"README.md: markers {begin} / {end} not found")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def generated() -> dict[Path, str]:
    readme = (ROOT / "README.md").read_text()
    readme = _between(readme, "config-reference", config_reference())
    readme = _between(readme, "figures", figures())
    return {ROOT / "README.md": readme, ROOT / BENCH_README: benchmark_report(RESULTS)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in generated().items():
        old = path.read_text() if path.exists() else None
        if old == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.write_text(text)
    if args.check and stale:
        print("out of date (run python scripts/gen_docs.py): " + ", ".join(map(str, stale)))
        return 1
    print(("rewrote: " + ", ".join(map(str, stale))) if stale else "generated docs up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
