"""Host reads per training step: the calls that make the host wait for the device on a GPU.

    OMP_NUM_THREADS=1 python benchmarks/count_syncs.py                  # this checkout
    OMP_NUM_THREADS=1 python benchmarks/count_syncs.py --repo /tmp/old  # another checkout, for a before/after

Two gloo ranks, ZeRO-2, a tiny random Qwen2, ``sequence_parallel.max_size: 2``, one global batch of
packed short samples and one long sample (dependent chunks, spread over both ranks), chunk size 64.
One warm-up step, then one counted step on rank 0: every call of ``item``, ``tolist``, ``cpu``,
``numpy``, ``nonzero`` and ``bool/int/float(tensor)`` inside ``engine.train_batch``, through a
``TorchFunctionMode``, grouped by the innermost caller in ds_chunkflow (``file:function``) or, for
calls from DeepSpeed / torch, by that library. On this CPU-only machine every such call is counted;
the callers say which ones read a device value on a GPU. ``--host_callers`` names the callers whose
tensors live on the host by design (this checkout: the inputs are cut and sharded on the host before
the one copy to the device, and the loss normaliser is counted on the host data); the rest are the
step's device reads (``device_reads`` in the JSON). Writes benchmarks/results/syncs[_<name>].json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOST_CALLERS = "runtime/batch.py:materialize,ops/sequence_parallel.py:shard_inputs,runtime/batch.py:num_targets"
COUNTED = {"item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__"}


def _caller(repo: str) -> str:
    frame = sys._getframe(2)
    library = None
    while frame is not None:
        file = frame.f_code.co_filename
        if file.startswith(repo) and "/ds_chunkflow/" in file:
            rel = file.split("/ds_chunkflow/", 1)[1]
            return f"{rel}:{frame.f_code.co_name}"
        if library is None and "site-packages/" in file:
            library = file.split("site-packages/", 1)[1].split("/", 1)[0]
        frame = frame.f_back
    return library or "other"


def worker(rank, world, repo, out):
    import torch
    from torch.overrides import TorchFunctionMode

    import ds_chunkflow
    from ds_chunkflow.testing.models import build_tiny_model

    ds_chunkflow.init_distributed()
    model = build_tiny_model("qwen2", seed=0)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": 2},
              "chunkflow": {"chunk_size": 64, "keep_chunks": 1, "sequence_parallel": {"max_size": 2}}}
    engine, *_ = ds_chunkflow.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3),
                                         config=config)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def sample(n):
        ids = torch.randint(0, vocab, (n,), generator=gen)
        return {"input_ids": ids, "labels": ids.clone()}

    batch = [sample(n) for n in (40, 17, 33, 25, 60, 12)] + [sample(512)]
    engine.train_batch(batch)
    counts: collections.Counter = collections.Counter()

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in COUNTED:
                counts[(name, _caller(repo))] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        engine.train_batch(batch)
    if rank == 0:
        layout = engine.last_metrics
        rows = [{"op": op, "caller": caller, "calls": n} for (op, caller), n in sorted(counts.items())]
        json.dump({"rows": rows, "total": sum(counts.values()),
                   "chunks": layout.get("chunks_standalone", 0) + layout.get("chunks_dependent", 0)},
                  open(out, "w"), indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=str(HERE.parent), help="the checkout whose ds_chunkflow is measured")
    p.add_argument("--name", default=None, help="suffix of the JSON name (default: none)")
    p.add_argument("--host_callers", default=HOST_CALLERS,
                   help="comma-separated callers that read host tensors (no device read on a GPU)")
    args = p.parse_args()
    repo = str(Path(args.repo).resolve())
    sys.path.insert(0, repo)
    os.environ["PYTHONPATH"] = repo + os.pathsep + os.environ.get("PYTHONPATH", "")
    from ds_chunkflow.testing.spawn import run_ranks

    out = HERE / "results" / (f"syncs_{args.name}.json" if args.name else "syncs.json")
    run_ranks(worker, repo, str(out))
    data = json.load(open(out))
    host = set(args.host_callers.split(",")) if args.host_callers else set()
    data.update(repo=repo, host_callers=sorted(host),
                device_reads=sum(r["calls"] for r in data["rows"] if r["caller"] not in host))
    json.dump(data, open(out, "w"), indent=1)
    print(f"{'calls':>6}  {'op':<10} caller")
    for r in data["rows"]:
        print(f"{r['calls']:>6}  {r['op']:<10} {r['caller']}{'  (host)' if r['caller'] in host else ''}")
    print(f"{data['total']:>6}  calls per step on rank 0 ({data['chunks']:.0f} chunks in the batch), "
          f"{data['device_reads']} of them device reads on a GPU")


if __name__ == "__main__":
    main()
