"""Peak CUDA memory and tokens/s vs. sequence length at fixed chunk_size (one GPU), or a CPU dry run.

    python benchmarks/bench_gpu.py                 # CUDA: bf16 Qwen2 (hidden 1024, 8 layers), chunk 4096, L up to 64K
    python benchmarks/bench_gpu.py --dry           # CPU: tiny model, two lengths: checks the script end to end

For one sequence of L = m x chunk_size tokens, one optimizer-free training step (forward +
backward) of a random Qwen2, each system on the same weights:
* ``chunkflow K=1`` : ``chunked_step`` (recompute), the kernels ds_chunkflow dispatches to;
* ``full+ckpt``     : the whole sequence in one call with transformers' gradient checkpointing
                      (stock SDPA attention), the baseline the paper compares K=1 against;
* ``full``          : the whole sequence without checkpointing (the memory shape ChunkFlow avoids).

Memory: ``torch.cuda.max_memory_allocated`` over the step minus what was allocated before it
(weights, gradients of the previous step), and ChunkFlow's K/V state (+ its gradient buffers)
apart, which grows linearly with L by design; "flat" means peak minus state stays constant.
Dry mode reports the saved-activation bytes (``ActivationMeter``) instead. An OOM is recorded,
not fatal. Writes ``<out>/bench_gpu.json`` (default benchmarks/results/gpu/, dry: .../gpu_dry/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import RESULTS, environment, table  # noqa: E402


def _model(args, device, dtype):
    import torch

    from ds_chunkflow.testing.models import build_tiny_model

    model = build_tiny_model("qwen2", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                             num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, dtype=torch.float32)
    return model.to(device=device, dtype=dtype)


def _sequence(n: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, vocab, (n,), generator=g)
    return [{"input_ids": ids, "labels": ids.clone()}]


def _full_step(model, seqs, device):
    import torch.nn.functional as F

    from ds_chunkflow.runtime.batch import shifted_targets

    s = seqs[0]
    logits = model(input_ids=s["input_ids"][None].to(device), use_cache=False).logits[0]
    loss = F.cross_entropy(logits.float(), shifted_targets(s["labels"]).to(device), reduction="mean")
    loss.backward()


def _point(model, system, seqs, args, device):
    import torch

    from ds_chunkflow import chunked_step
    from ds_chunkflow.ops import kernels
    from ds_chunkflow.runtime.memory import ActivationMeter

    cuda = device.type == "cuda"
    used: set[str] = set()
    choose = kernels.choose_kernel

    def recording(*a, **k):
        choice = choose(*a, **k)
        used.add(choice.kernel)
        return choice

    kernels.choose_kernel = recording
    ckpt = system == "full+ckpt"
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    times, state, meter = [], 0, None
    try:
        for i in range(args.repeats + 1):  # the first is warm-up
            model.zero_grad(set_to_none=False)
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            meter = ActivationMeter()
            start = time.perf_counter()
            if system.startswith("chunkflow"):
                state = chunked_step(model, seqs, chunk_size=args.chunk_size, keep_chunks=1, meter=meter).peak_state_bytes
            else:
                from ds_chunkflow.runtime.memory import saved_tensor_hooks

                with saved_tensor_hooks(meter):
                    _full_step(model, seqs, device)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() - base) if cuda else meter.peak
        activations = peak - state if cuda else peak  # the meter never sees the state buffers
        row = dict(peak_MiB=peak / 2**20, kv_state_MiB=state / 2**20, peak_minus_state_MiB=activations / 2**20,
                   step_s=min(times[1:]), tokens_per_s=seqs[0]["input_ids"].numel() / min(times[1:]))
    except torch.OutOfMemoryError:
        row = dict(oom=True)
    finally:
        kernels.choose_kernel = choose
        if ckpt:
            model.gradient_checkpointing_disable()
        if cuda:
            torch.cuda.empty_cache()
    row["kernels"] = sorted(used)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry", action="store_true", help="CPU, tiny model, two lengths (no GPU needed)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--chunk_size", type=int, default=None)
    parser.add_argument("--multiples", type=int, nargs="+", default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--kv_heads", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--full_max_multiple", type=int, default=8, help="run 'full' (no checkpointing) up to here")
    args = parser.parse_args()
    import torch

    defaults = dict(chunk_size=64, multiples=[2, 4], hidden=64, layers=2, heads=4, kv_heads=2, vocab=256) if args.dry \
        else dict(chunk_size=4096, multiples=[1, 2, 4, 8, 16], hidden=1024, layers=8, heads=16, kv_heads=4, vocab=32768)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = args.out or (RESULTS / ("gpu_dry" if args.dry else "gpu"))
    if args.dry:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_gpu.py needs CUDA (or --dry)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
    model = _model(args, device, dtype)
    rows = []
    for m in args.multiples:
        seqs = _sequence(m * args.chunk_size, args.vocab)
        for system in ("chunkflow K=1", "full+ckpt", "full"):
            if system == "full" and m > args.full_max_multiple:
                continue
            row = dict(system=system, multiple=m, tokens=m * args.chunk_size, **_point(model, system, seqs, args, device))
            rows.append(row)
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    columns = ["system", "multiple", "tokens", "peak_MiB", "kv_state_MiB", "peak_minus_state_MiB", "tokens_per_s"]
    print()
    print(table(rows, columns))
    k1 = [r for r in rows if r["system"] == "chunkflow K=1" and not r.get("oom")]
    summary = {}
    if len(k1) >= 2:
        flat = [r["peak_minus_state_MiB"] for r in k1]
        summary["k1_peak_minus_state_growth_first_to_last"] = flat[-1] / flat[0]
    for m in args.multiples:
        at = {r["system"]: r for r in rows if r["multiple"] == m and not r.get("oom")}
        if "chunkflow K=1" in at and "full+ckpt" in at:
            summary[f"{m}x_k1_speed_vs_full_ckpt"] = at["chunkflow K=1"]["tokens_per_s"] / at["full+ckpt"]["tokens_per_s"]
            summary[f"{m}x_k1_peak_vs_full_ckpt"] = at["chunkflow K=1"]["peak_MiB"] / at["full+ckpt"]["peak_MiB"]
    from ds_chunkflow.ops import varlen

    env = environment()
    env.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               cuda=torch.version.cuda, flash_attn=varlen.flash_attn_varlen_func() is not None, dry=args.dry)
    print("\nsummary:", json.dumps(summary, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_gpu.json"
    path.write_text(json.dumps({"environment": env, "config": {k: (str(v) if isinstance(v, Path) else v)
                                                              for k, v in vars(args).items()},
                                "rows": rows, "summary": summary}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
