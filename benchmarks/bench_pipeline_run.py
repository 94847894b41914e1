"""A measured 2-stage pipeline run: ChunkFlow's pipeline engine against DeepSpeed's own.

    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline_run.py            # full (< 5 min on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline_run.py --quick    # smoke run (< 1 min)

Two gloo ranks = two pipeline stages (DeepSpeed's CPU accelerator, spawned by
``ds_chunkflow.testing.spawn``), a tiny random Qwen2 (4 layers, hidden 128, vocab 512), fp32, a
client ``torch.optim.AdamW``, ``gradient_clipping: 0``, ZeRO ``--zero_stage`` (0 or 1).
Both systems train on the same global batches (``--global_batch`` chat samples of
``examples/data/sample_sft.jsonl``, toy tokenizer, samples over ``--max_len`` left out, seeded
shuffle) with the same objective ``sum(CE over loss tokens) / loss tokens of the global batch``,
so their losses must agree:

* ``chunkflow``  ``pipeline_module(model, 2)`` + ``ds_chunkflow.initialize`` with a chunkflow
                 section; ``engine.train_batch(sequences)``: the batch is packed / split into
                 chunks of ``--chunk_size`` tokens, one micro-batch per chunk, state-aware 1F1B;
* ``deepspeed``  plain ``deepspeed.initialize`` on a ``PipelineModule(dynamic_shape=True)``
                 built from the same layer wrappers with the stock SDPA attention; the batch in
                 its given order, cut into micro-batches of ``--micro_batch`` samples, each
                 right-padded to its longest sample; ``train_batch(data_iter)`` (TrainSchedule,
                 1F1B). Causal attention without a mask is exact for right padding (pad tokens
                 come after the real ones); pad positions carry no loss::

                     input_ids  [a0 a1 a2 a3 | b0 b1 pp pp]     (2 samples, padded to 4)
                     targets    [a1 a2 a3 -- | b1 -- -- --]

Each system runs in fresh processes (peak RSS is per process, per stage). One warm-up step (a
batch of short samples), then ``--steps`` timed steps with a barrier before and after each.
``idle`` is the share of a stage's step time spent outside forward / backward / recompute
(pipeline bubble + send/receive + optimizer), measured by timing those instructions.
``sim_bubble`` is :mod:`ds_chunkflow.plan.simulate`'s bubble for the same batches: plain
1F1B over the padded micro-batches vs the plan ChunkFlow's engine runs, with the engine's
planning cost (tokens + pairs / (6 x 4096)); ``sim_bubble_h128`` times the same orders with
this model's attention weight (pairs / (6 x 128)), closer to what the CPU spends.
Writes benchmarks/results/pipeline_run.json (pipeline_run_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]
from _common import load_samples, num_loss_tokens, rss_bytes, save_json, table, targets_of  # noqa: E402

MODEL = {"vocab_size": 512, "hidden_size": 128, "num_layers": 4}
SYSTEMS = ("chunkflow", "deepspeed")
STAGES = 2
COMPUTE = ("ForwardPass", "BackwardPass", "StateForwardPass", "RecomputeForwardPass")


# ----------------------------------------------------------------------------- data (pure)
def make_batches(samples: list[dict], global_batch: int, steps: int, seed: int):
    """(warm-up batch, timed batches) from one seeded shuffle. The warm-up batch has the same
    number of samples (DeepSpeed's micro-batch count is fixed), all of them <= 1024 tokens."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    if steps * global_batch > len(order):
        raise ValueError(f"{steps} steps of {global_batch} samples need more than {len(order)} samples")
    batches = [[samples[i] for i in order[s * global_batch:(s + 1) * global_batch]] for s in range(steps)]
    short = [samples[i] for i in order[steps * global_batch:] + order if len(samples[i]["input_ids"]) <= 1024]
    return short[:global_batch], batches


def padded_micro_batches(batch: list[dict], micro_batch: int, pad_id: int) -> list[dict]:
    """Consecutive samples, ``micro_batch`` at a time, right-padded to the longest of them."""
    out = []
    for i in range(0, len(batch), micro_batch):
        group = batch[i:i + micro_batch]
        t = max(len(s["input_ids"]) for s in group)
        pad = [t - len(s["input_ids"]) for s in group]
        out.append({"input_ids": [s["input_ids"] + [pad_id] * p for s, p in zip(group, pad)],
                    "targets": [targets_of(s["labels"]) + [-100] * p for s, p in zip(group, pad)],
                    "rows": len(group), "length": t})
    return out


def chunkflow_chunks(batch: list[dict], cfg: dict) -> list:
    """The chunks the engine runs, in its order (1 pipeline replica: one share)."""
    from ds_chunkflow.runtime.batch_plan import plan_batch

    seqs = [{k: torch.tensor(v) for k, v in s.items()} for s in batch]
    share = plan_batch(seqs, chunk_size=cfg["chunk_size"], keep_chunks=cfg["keep_chunks"], num_ranks=1).shares[0]
    return [c for g in share.groups for c in g] + share.standalone


def _bubble(timeline) -> float:
    busy = sum(b - a for row in timeline for a, b, _ in row)
    span = max(row[-1][1] for row in timeline if row)
    return 1.0 - busy / (len(timeline) * span)


def simulated(system: str, batch: list[dict], cfg: dict) -> dict:
    """Simulated bubble of one batch: under the engine's planning cost, and under h = 128."""
    from ds_chunkflow.plan.chunking import Chunk, CostModel, Segment
    from ds_chunkflow.plan.instructions import letter
    from ds_chunkflow.plan.planner import plan_stages, replay

    planning, model = CostModel(), CostModel(attention=1.0 / (6 * MODEL["hidden_size"]))
    if system == "chunkflow":
        chunks = chunkflow_chunks(batch, cfg)
        p = plan_stages(chunks, STAGES, cfg["keep_chunks"], [planning.chunk_cost(c) for c in chunks])
        ops = sum(letter(op) in "FSR" for op in p.forward)
        recomputes = sum(letter(op) == "R" for op in p.forward)
        costs_h128 = [model.chunk_cost(c) for c in chunks]
    else:
        mbs = padded_micro_batches(batch, cfg["micro_batch"], cfg["pad_id"])
        chunks = [Chunk((Segment(i, 0, m["rows"] * m["length"]),)) for i, m in enumerate(mbs)]

        def cost(m, c):  # rows x T tokens, rows x T(T+1)/2 pairs: padding computes like real tokens
            return m["rows"] * (m["length"] * c.linear + m["length"] * (m["length"] + 1) / 2 * c.attention)

        p = plan_stages(chunks, STAGES, 1, [cost(m, planning) for m in mbs], strategy="given")
        ops, recomputes = len(chunks), 0
        costs_h128 = [cost(m, model) for m in mbs]
    return {"micro_batches": len(chunks), "forward_ops": ops, "recomputes": recomputes,
            "token_slots": sum(c.num_tokens for c in chunks), "sim_bubble": _bubble(p.timeline),
            "sim_bubble_h128": _bubble(replay(p.orders, chunks, costs_h128))}


# ----------------------------------------------------------------------------- inside a rank
def _model():
    from ds_chunkflow.testing.models import build_tiny_model

    model = build_tiny_model("qwen2", **MODEL, seed=0)
    model.config._attn_implementation = "sdpa"
    return model.train()


def _ds_config(cfg: dict, micro_batch: int, gas: int) -> dict:
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": gas,
            "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": cfg["zero_stage"]}, "steps_per_print": 10**9}


def _chunkflow_engine(cfg: dict):
    import ds_chunkflow
    from ds_chunkflow.pipeline.model import pipeline_module

    module = pipeline_module(_model(), STAGES)
    config = _ds_config(cfg, 1, 1)
    config["chunkflow"] = {"chunk_size": cfg["chunk_size"], "keep_chunks": cfg["keep_chunks"],
                           "pad_token_id": cfg["pad_id"]}
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg["lr"], weight_decay=0.0)
    engine = ds_chunkflow.initialize(model=module, optimizer=optimizer, config=config)[0]
    return engine, lambda batch: engine.train_batch([{k: torch.tensor(v) for k, v in s.items()} for s in batch])


def _deepspeed_engine(cfg: dict):
    """Stock PipelineEngine; the same layer wrappers with ``ctx=None`` (the stock attention)."""
    import deepspeed
    import torch.nn.functional as F
    from deepspeed.pipe import PipelineModule

    from ds_chunkflow.pipeline.model import ChunkSlot, pipe_layers

    model, gas = _model(), cfg["global_batch"] // cfg["micro_batch"]
    slot, norm = ChunkSlot(), {"loss_tokens": 1}
    layers = pipe_layers(model, slot)

    def loss_fn(hidden, targets):  # x gas: DeepSpeed divides each micro-batch's loss by gas
        logits = slot.head.logits(hidden)  # the head layer passes hidden on; the stock way: full logits + CE
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        return ce * (gas / norm["loss_tokens"])

    module = PipelineModule(layers=layers, num_stages=STAGES, loss_fn=loss_fn,
                            partition_method="type:DecoderLayerPipe", dynamic_shape=True)
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg["lr"], weight_decay=0.0)
    engine = deepspeed.initialize(model=module, optimizer=optimizer, config=_ds_config(cfg, cfg["micro_batch"], gas))[0]

    def step(batch):
        norm["loss_tokens"] = num_loss_tokens(batch)
        data = []
        for m in padded_micro_batches(batch, cfg["micro_batch"], cfg["pad_id"]):
            ids = torch.tensor(m["input_ids"])
            positions = torch.arange(ids.shape[1]).expand_as(ids).contiguous()
            data.append(((ids, positions), torch.tensor(m["targets"])))
        return engine.train_batch(iter(data))

    return engine, step


def _time_compute(engine, busy: list[float]) -> None:
    """Wraps the compute instructions' handlers (this engine only) to add their time to busy[0]."""
    def timed(handler):
        def run(self, **kwargs):
            t = time.perf_counter()
            try:
                return handler(self, **kwargs)
            finally:
                busy[0] += time.perf_counter() - t
        return run

    engine._INSTRUCTION_MAP = {k: timed(v) if k.__name__ in COMPUTE else v
                               for k, v in type(engine)._INSTRUCTION_MAP.items()}


def worker(rank, world, system, cfg, warmup, batches, out_prefix):
    import torch.distributed as dist

    import ds_chunkflow

    ds_chunkflow.init_distributed()  # PipelineModule needs the process group
    t = time.perf_counter()
    engine, step = (_chunkflow_engine if system == "chunkflow" else _deepspeed_engine)(cfg)
    rec = {"init_s": time.perf_counter() - t, "rss_after_init": rss_bytes(), "step_s": [], "busy_s": [], "losses": []}
    busy = [0.0]
    _time_compute(engine, busy)
    rec["warmup_loss"] = step(warmup).item()
    for batch in batches:
        dist.barrier()
        busy[0], t = 0.0, time.perf_counter()
        rec["losses"].append(step(batch).item())
        dist.barrier()
        rec["step_s"].append(time.perf_counter() - t)
        rec["busy_s"].append(busy[0])
    rec["peak_rss"] = rss_bytes()
    Path(f"{out_prefix}.{rank}").write_text(json.dumps(rec))


# ----------------------------------------------------------------------------- driver
def run_system(system, cfg, warmup, batches) -> list[dict]:
    from ds_chunkflow.testing.spawn import run_ranks  # spawned gloo ranks, OMP_NUM_THREADS=1

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, system)
        run_ranks(worker, system, cfg, warmup, batches, prefix, world=STAGES, timeout=cfg["timeout"])
        return [json.loads(Path(f"{prefix}.{r}").read_text()) for r in range(STAGES)]


def summarise(system, ranks, batches, cfg) -> dict:
    seconds = sum(ranks[0]["step_s"])
    tokens = sum(len(s["input_ids"]) for b in batches for s in b)
    sims = [simulated(system, b, cfg) for b in batches]
    mean = lambda key: sum(s[key] for s in sims) / len(sims)  # noqa: E731
    row = {"system": system, "tokens_per_s": tokens / seconds, "s_per_step": seconds / len(batches),
           "micro_batches": mean("micro_batches"), "forward_ops": mean("forward_ops"),
           "slots_per_real": sum(s["token_slots"] for s in sims) / tokens}
    for r, rank in enumerate(ranks):
        row[f"idle_s{r}"] = 1.0 - sum(rank["busy_s"]) / sum(rank["step_s"])
    row.update(sim_bubble=mean("sim_bubble"), sim_bubble_h128=mean("sim_bubble_h128"))
    for r, rank in enumerate(ranks):
        row[f"rss_s{r}_mib"] = rank["peak_rss"] / 2**20
    row.update(final_loss=ranks[0]["losses"][-1], losses=ranks[0]["losses"], step_s=ranks[0]["step_s"],
               busy_s=[rank["busy_s"] for rank in ranks], init_s=max(r["init_s"] for r in ranks),
               rss_after_init_mib=[r["rss_after_init"] / 2**20 for r in ranks], per_batch=sims)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="1 step of 16 samples <= 2048 tokens, chunk_size 128 (so some samples still split)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--global_batch", type=int, default=32)
    p.add_argument("--micro_batch", type=int, default=4, help="deepspeed: samples per padded micro-batch")
    p.add_argument("--max_len", type=int, default=8192, help="samples longer than this are left out")
    p.add_argument("--chunk_size", type=int, default=1024)
    p.add_argument("--keep_chunks", type=int, default=1)
    p.add_argument("--zero_stage", type=int, default=1, choices=(0, 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    steps, global_batch, max_len = (1, 16, 2048) if args.quick else (args.steps, args.global_batch, args.max_len)
    chunk_size = 128 if args.quick else args.chunk_size
    if global_batch % args.micro_batch:
        p.error(f"--global_batch ({global_batch}) must be a multiple of --micro_batch ({args.micro_batch})")

    from ds_chunkflow.testing.tokenizer import build_tokenizer

    warmup, batches = make_batches(load_samples(max_len), global_batch, steps, args.seed)
    cfg = {"steps": steps, "global_batch": global_batch, "micro_batch": args.micro_batch, "max_len": max_len,
           "chunk_size": chunk_size, "keep_chunks": args.keep_chunks, "zero_stage": args.zero_stage, "lr": 1e-3,
           "seed": args.seed, "pad_id": build_tokenizer().pad_token_id, "timeout": 600, "stages": STAGES,
           "precision": "fp32", "optimizer": "torch.optim.AdamW", "model": {"family": "qwen2", **MODEL}}
    lens = [[len(s["input_ids"]) for s in b] for b in batches]
    flat = sorted(n for x in lens for n in x)
    data = {"tokens_per_step": [sum(x) for x in lens], "longest_per_step": [max(x) for x in lens],
            "median_len": flat[len(flat) // 2], "lengths": lens}
    print(f"data: {steps} steps x {global_batch} samples, tokens per step {data['tokens_per_step']}, "
          f"longest per step {data['longest_per_step']}, median {data['median_len']}", flush=True)

    rows = []
    for system in args.systems.split(","):
        t = time.perf_counter()
        rows.append(summarise(system, run_system(system, cfg, warmup, batches), batches, cfg))
        r = rows[-1]
        print(f"  {system}: {time.perf_counter() - t:.1f} s wall; per step: seconds "
              f"{[round(x, 2) for x in r['step_s']]}, micro-batches {[b['micro_batches'] for b in r['per_batch']]}, "
              f"recomputes {[b['recomputes'] for b in r['per_batch']]}", flush=True)
    base = next((r for r in rows if r["system"] == "deepspeed"), None)
    for r in rows:
        if base is not None:
            r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["max_loss_diff"] = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
    columns = ["system", "tokens_per_s", "s_per_step", "speedup", "micro_batches", "forward_ops", "slots_per_real",
               "idle_s0", "idle_s1", "sim_bubble", "sim_bubble_h128", "rss_s0_mib", "rss_s1_mib", "max_loss_diff"]
    print(table(rows, [c for c in columns if c in rows[0]]))
    path = save_json("pipeline_run_quick.json" if args.quick else "pipeline_run.json",
                     {"config": cfg, "data": data, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
