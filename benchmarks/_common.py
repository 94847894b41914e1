"""Shared benchmark plumbing: environment facts, a plain-text table, JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


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
