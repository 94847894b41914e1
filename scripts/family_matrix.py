"""The family matrix as a table + JSON: every family of ds_chunkflow.testing.families, float64,
K in {1, 2, N}, chunked vs the plain full-sequence reference (or the guard's refusal).

    python scripts/family_matrix.py        # -> benchmarks/results/family_matrix.json

The tests (tests/hf/test_families.py) assert the same verdicts; this prints the errors.
"""

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ds_chunkflow
from ds_chunkflow.hf.guard import ModelRefused, check_model
from ds_chunkflow.testing.families import EXACT, REFUSED, build, exact_case

CHUNK, LENGTHS, KEEPS = 8, [37, 11, 5, 3, 1], (1, 2, 5)
OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "family_matrix.json"


def reference(model, seqs):
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for s in seqs:
        logits = model(input_ids=s["input_ids"][None]).logits[0].double()
        targets = torch.cat([s["labels"][1:], torch.tensor([-100])])
        total = total + F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    (total / count).backward()
    return (total / count).item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(model, ref):
    worst = 0.0
    for n, p in model.named_parameters():
        if n in ref:
            worst = max(worst, ((p.grad - ref[n]).abs().max() / (ref[n].abs().max() or 1.0)).item())
    return worst


def main():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    seqs = []
    for n in LENGTHS:
        ids = torch.randint(0, 128, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = -100
        seqs.append({"input_ids": ids, "labels": labels})
    rows = []
    for family in sorted(EXACT):
        model_type, kind, overrides, tol = exact_case(family)
        model = build(model_type, overrides)
        report = check_model(model)
        ref_loss, ref = reference(model, seqs)
        for k in KEEPS:
            model.zero_grad(set_to_none=True)
            loss = ds_chunkflow.chunked_forward_backward(model, seqs, chunk_size=CHUNK, keep_chunks=k).item()
            err = max(abs(loss - ref_loss) / abs(ref_loss), rel_err(model, ref))
            rows.append(dict(family=family, kind=kind, mode="single process", k=k, verdict="exact" if err < tol else
                             "WRONG", error=err, tolerance=tol, probe_seconds=report.seconds))
    for family in sorted(REFUSED):
        model_type, kind, overrides, _ = REFUSED[family]
        model = build(model_type, overrides, dtype=torch.float32)
        start = time.perf_counter()
        try:
            check_model(model)
            verdict, why = "NOT REFUSED", ""
        except ModelRefused as e:
            verdict, why = "refused", str(e).split(": ", 1)[1].split(";")[0][:90]
        rows.append(dict(family=family, kind=kind, mode="single process", k="-", verdict=verdict, error=None,
                         tolerance=None, probe_seconds=time.perf_counter() - start, reason=why))
    print(f"{'family':20s} {'kind':38s} {'K':>2s} {'verdict':8s} {'error':>9s}")
    for r in rows:
        err = f"{r['error']:.1e}" if r["error"] is not None else r.get("reason", "")
        print(f"{r['family']:20s} {r['kind']:38s} {r['k']!s:>2s} {r['verdict']:8s} {err}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=1))
    print(f"saved {OUT}")


if __name__ == "__main__":
    main()
