"""Shared benchmark plumbing: environment facts, a plain-text table, JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "command": " ".join([Path(sys.executable).name] + sys.argv)}
    try:
        import deepspeed
        import transformers

        env.update(deepspeed=deepspeed.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return env


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def save_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2))
    return path


# ----------------------------------------------------------------------------- sample data
def load_samples(max_len: int | None) -> list[dict]:
    """Tokenised sample chats as plain lists (cheap to send to spawned ranks)."""
    from ds_chunkflow.data.jsonl import load_jsonl
    from ds_chunkflow.testing.tokenizer import build_tokenizer

    data = load_jsonl(REPO / "examples/data/sample_sft.jsonl", build_tokenizer())
    out = [{k: data[i][k].tolist() for k in ("input_ids", "labels")} for i in range(len(data))]
    return [s for s in out if max_len is None or len(s["input_ids"]) <= max_len]


def targets_of(labels: list[int]) -> list[int]:
    """HF labels (unshifted) -> per-position targets: position t predicts labels[t + 1]."""
    return labels[1:] + [-100]


def num_loss_tokens(batch: list[dict]) -> int:
    return sum(sum(t != -100 for t in s["labels"][1:]) for s in batch)


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def in_fresh_process(target, *args):
    """``target(*args, queue)`` in a new spawned process (so its peak RSS is its own); returns what it put."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def save_random_qwen2(model_dir: str, config: dict) -> int:
    """A random-init Qwen2 of ``config`` (hidden_size, num_layers, vocab_size and other config keys) saved with
    ``save_pretrained`` to ``model_dir``; returns its parameter count."""
    from ds_chunkflow.testing.models import build_tiny_model

    cfg = dict(config)
    model = build_tiny_model("qwen2", save_dir=model_dir, seed=0, hidden_size=cfg.pop("hidden_size"),
                             num_layers=cfg.pop("num_layers"), vocab_size=cfg.pop("vocab_size"), **cfg)
    return sum(p.numel() for p in model.parameters())
