"""Per-step metrics, written through DeepSpeed's monitor (wandb, tensorboard, csv)."""

from __future__ import annotations

from ds_chunkflow.deepspeed.deepspeed_adapter import monitor_writers
from ds_chunkflow.runtime.batch_plan import BatchPlan
from ds_chunkflow.runtime.executor import ExecStats


def step_metrics(batch: BatchPlan, loss: float, seconds: float, peak_rss: int, stats: ExecStats | None = None,
                 peak_activation_bytes: float | None = None) -> dict[str, float]:
    """Global-batch figures (the same on every rank, except the memory ones: the max over ranks).

    From ``stats``: ``offloaded_bytes``, the activation bytes saved for backward that were
    moved to the CPU, and ``kv_state_bytes_moved``, the K/V state bytes copied between the
    CPU-resident state and the compute device; both 0 when nothing is offloaded. Both are
    traffic volumes: the caller passes them summed over the data-parallel ranks (the
    engine all-reduces them), ``peak_kv_state_bytes`` as the max over ranks; ``recomputed_chunks``,
    the chunk forwards run again for backward, summed over ranks too; for hybrid models
    ``mixer_state_bytes_per_boundary``, one sample's recurrent-mixer state at one chunk boundary
    (constant in the sample's length, unlike K/V; max over ranks); ``backward_calls``, this rank's backward
    calls (pads included: the same count on every data-parallel rank; under ZeRO-2 each reduces the gradients).
    """
    layout = batch.layout
    tokens = layout.num_real_tokens
    metrics = {
        "loss": loss,
        "tokens_per_sec": tokens / max(seconds, 1e-9),
        "step_time_sec": seconds,
        "tokens": float(tokens),
        "loss_tokens": float(batch.num_loss_tokens),
        "chunks_standalone": float(len(layout.standalone)),
        "chunks_dependent": float(sum(len(g) for g in layout.groups)),
        "packing_efficiency": layout.packing_efficiency,
        "recompute_fraction": batch.recompute_fraction(),
        "dp_imbalance": batch.imbalance,
        "sequence_parallel_groups": float(batch.num_sp_groups),
        "samples_skipped": float(batch.num_skipped),
        "peak_rss_bytes": float(peak_rss),
    }
    if stats is not None:
        metrics["peak_kv_state_bytes"] = float(stats.peak_state_bytes)
        metrics["offloaded_bytes"] = float(stats.offloaded_bytes)
        metrics["kv_state_bytes_moved"] = float(stats.state_bytes_moved)
        metrics["recomputed_chunks"] = float(stats.num_recomputes)
        metrics["backward_calls"] = float(stats.num_backwards)  # this rank's (ZeRO-2: gradient reductions)
        if stats.mixer_state_bytes:
            metrics["mixer_state_bytes_per_boundary"] = float(stats.mixer_state_bytes)
    if peak_activation_bytes is not None:
        metrics["peak_activation_bytes"] = float(peak_activation_bytes)
    return metrics


def time_breakdown(stats, **phases: float) -> dict[str, float]:
    """``time_<part>_s`` of one step on this rank: the engine's ``phases`` (planning, the executor, the
    optimizer step, the end-of-step metric all-reduces with the step's one loss read) and, inside the
    executor, its time per instruction kind (``stats.seconds``: forward, state_forward, recompute, backward
    (gradient reduction included), lockstep_pad: the one-token calls that keep ranks in lock-step, other:
    the executor's own Python), plus ``time_per_instruction_overhead_s``."""
    out = {f"time_{name}_s": float(v) for name, v in phases.items()}
    out.update({f"time_{name}_s": float(v) for name, v in stats.seconds.items()})
    if stats.num_instructions:
        out["time_per_instruction_overhead_s"] = stats.seconds.get("other", 0.0) / stats.num_instructions
    return out


def write_events(monitor, metrics: dict[str, float], step: int, wandb_step: int,
                 prefix: str = "Train/chunkflow/") -> None:
    """``<prefix><name>`` events (``Train/chunkflow/<name>``; ``eval/<name>`` for evaluations) through
    DeepSpeed's monitor, at the optimizer ``step``.

    wandb needs one monotonic step per run, and DeepSpeed logs its own ``Train/Samples/*`` events at
    its sample counter (``engine.global_samples``), which runs ahead of the optimizer step; wandb would
    drop ours (with a warning). So wandb gets them at ``wandb_step`` (that counter) with the optimizer
    step as one more metric, ``optimizer_step``; csv / tensorboard / comet at the optimizer step.
    """
    events = [(f"{prefix}{k}", v, step) for k, v in metrics.items()]
    writers, wandb = monitor_writers(monitor)
    for writer in writers:
        writer.write_events(events)
    if wandb is not None:
        wandb.write_events([(label, value, wandb_step) for label, value, _ in events]
                           + [(f"{prefix}optimizer_step", float(step), wandb_step)])
