"""ChunkFlowEngine: a thin DeepSpeedEngine subclass that trains on ChunkFlow chunks.

``train_batch(sequences)`` takes one whole global batch (the same list on every
data-parallel rank), plans it with :func:`ds_chunkflow.runtime.batch_plan.plan_batch`, runs this
rank's share through :class:`ds_chunkflow.runtime.executor.Executor` with the engine as the
forward and ``engine.backward`` as the backward, and takes one optimizer step.

Gradient scale: rank r's loss is ``sum(CE of its chunks) / N_global``; DeepSpeed
averages gradients over the W data-parallel ranks, so each backward is given
``W * loss`` and the average is the exact gradient of the global-batch loss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Sequence

import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from ds_chunkflow.config import ChunkFlowConfig
from ds_chunkflow.deepspeed import checkpoint
from ds_chunkflow.deepspeed.deepspeed_adapter import Zero3LiveGraphs, all_to_all_dim0, count_param_gathers
from ds_chunkflow.deepspeed.distributed import agree_on_errors, all_reduce
from ds_chunkflow.deepspeed.monitor import step_metrics, time_breakdown, write_events
from ds_chunkflow.hf.export import save_hf_metadata
from ds_chunkflow.hf.guard import check_model
from ds_chunkflow.hf.model import enable_recompute
from ds_chunkflow.ops.mixers import supported_mixers
from ds_chunkflow.ops.sequence_parallel import (
    SequenceParallelGroup,
    SequenceParallelRefused,
    check_heads,
    sp_group_ranks,
)
from ds_chunkflow.plan.chunking import CostModel, sp_sizes
from ds_chunkflow.runtime.batch import SequenceDict, count_loss_tokens
from ds_chunkflow.runtime.batch_plan import BatchPlan, plan_batch
from ds_chunkflow.runtime.chunk import ChunkRuntime, get_rng, hooks, set_rng
from ds_chunkflow.runtime.executor import Executor, GraphHooks, no_backward
from ds_chunkflow.runtime.memory import peak_rss_bytes

SAMPLER_KEY = "ds_chunkflow_sampler"
EVAL_BATCH_SAMPLES = 256  # samples planned together by evaluate(): the whole set is never planned at once
logger = logging.getLogger(__name__)


class ChunkFlowMixin:
    """What both ChunkFlow engines add to DeepSpeed's: the global-batch sampler, its
    position in checkpoints, and metrics through DeepSpeed's monitor."""

    def __init__(self, *args, chunkflow_config: ChunkFlowConfig, chunkflow_data=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.chunkflow_config = chunkflow_config
        self.chunkflow_dataset = chunkflow_data
        self.chunkflow_sampler = None
        if chunkflow_data is not None:
            self.chunkflow_sampler = _make_sampler(chunkflow_data, chunkflow_config)
        self.last_metrics: dict[str, float] = {}
        self.chunkflow_tokenizer = None
        """Saved with every checkpoint (``<tag>/hf_model``) when set, for ``python -m ds_chunkflow.hf.export``."""

    def next_global_batch(self) -> list[SequenceDict]:
        if self.chunkflow_sampler is None:
            raise ValueError("train_batch() without sequences needs training_data (an SFTDataset) and "
                             "chunkflow.data.global_batch_size or global_batch_tokens")
        indices = next(self.chunkflow_sampler)
        return [self.chunkflow_dataset[i] for i in indices]

    def _plan_agreed(self, sequences: Sequence[SequenceDict], num_ranks: int, cost: CostModel,
                     group, sp_max_size: int = 1, evaluation: bool = False) -> BatchPlan:
        """The batch plan, or the same error on every rank of ``group``; the batch itself is checked equal.

        Under ZeRO every forward / backward is a collective and in a pipeline every chunk a message,
        so one rank failing to plan, or planning a different batch, would leave the others waiting.
        """
        cf = self.chunkflow_config
        error, batch = None, None
        try:
            batch = plan_batch(sequences, chunk_size=cf.chunk_size, keep_chunks=cf.keep_chunks, num_ranks=num_ranks,
                               offload_activations=cf.offload.activations == "far", cost=cost,
                               max_seq_len=None if evaluation else cf.max_seq_len, on_overlong=cf.on_overlong,
                               sp_max_size=sp_max_size, evaluation=evaluation,
                               forwards_collective=self.zero_optimization_stage() == 3,
                               backwards_collective=self.zero_optimization_stage() == 2,
                               sp_longer_chunks=cf.sequence_parallel.longer_chunks)
        except (ValueError, TypeError) as e:
            error = e
        agree_on_errors(error, group=group, device=self.device)
        shape = [batch.num_loss_tokens, batch.layout.num_real_tokens, len(batch.sequences)]
        extremes = all_reduce(shape + [-x for x in shape], "max", group, self.device)
        if extremes[:3] != [-x for x in extremes[3:]]:
            raise RuntimeError("ranks were given different global batches: train_batch needs the same list of "
                               "sequences on every rank (every data-parallel rank and every pipeline stage)")
        return batch

    def _cost_model(self, evaluation: bool = False) -> CostModel:
        weight = self.chunkflow_config.balance.attention_cost_weight
        if weight is None:
            config = getattr(self.module, "hf_config", None) or self.module.config
            weight = 1.0 / (6 * getattr(config, "hidden_size", 4096))
        cf = self.chunkflow_config
        # evaluation and far offload forward nothing twice
        recomputes = not evaluation and cf.offload.activations != "far" and isinstance(cf.keep_chunks, int)
        return CostModel(linear=1.0, attention=weight, all_to_all=cf.sequence_parallel.all_to_all_cost_weight,
                         keep_chunks=cf.keep_chunks if recomputes else None)

    def _write_metrics(self, metrics: dict[str, float]) -> None:
        stats = getattr(self.chunkflow_dataset, "stats", None)  # what the data loader skipped or cut (opt-in)
        if stats is not None:
            metrics["data_lines_skipped"] = float(stats.num_skipped)
            metrics["data_samples_truncated"] = float(stats.num_truncated)
            metrics.update({f"data_skipped_{reason}": float(n) for reason, n in sorted(stats.skipped.items())})
        metrics.update(getattr(self.chunkflow_sampler, "source_metrics", dict)())  # data_drawn_<source> (a mix)
        lr = getattr(self, "chunkflow_step_lr", None)
        if lr is not None:
            metrics["lr"] = lr
        self.last_metrics = metrics
        if self.monitor.enabled and self.global_rank == 0:
            write_events(self.monitor, metrics, self.global_steps, self.global_samples)

    def evaluate(self, data, batch_samples: int = EVAL_BATCH_SAMPLES) -> float:
        raise NotImplementedError(
            f"{type(self).__name__}.evaluate: evaluation is not supported in pipeline mode (its schedule has no "
            "forward-only pass yet); evaluate with the data-parallel engine (no `pipeline` section), or leave "
            "--eval_data / --eval_split unset")

    def _take_model_step(self, *args, **kwargs):
        """DeepSpeed's optimizer step (deepspeed_adapter touch point 8), once per global batch: records the
        learning rate it applies (first parameter group; ``lr`` in the step metrics) before the schedule moves."""
        self.chunkflow_step_lr = float(self.get_lr()[0])
        return super()._take_model_step(*args, **kwargs)

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, **kwargs):
        """DeepSpeed's save, made crash-safe (:mod:`ds_chunkflow.deepspeed.checkpoint`): files durable on every
        rank, a barrier, then a manifest marking the tag complete, then ``latest``, atomically."""
        client_state = dict(client_state or {})
        tag = str(tag) if tag is not None else f"global_step{self.global_steps}"
        if self.global_rank == 0:  # config and tokenizer beside the weights: the tag converts offline
            tag_dir = os.path.join(save_dir, tag)
            os.makedirs(tag_dir, exist_ok=True)
            save_hf_metadata(tag_dir, self.module, self.chunkflow_tokenizer)
        if self.chunkflow_sampler is not None:
            client_state[SAMPLER_KEY] = self.chunkflow_sampler.state_dict()
        return checkpoint.save_checkpoint(self, super().save_checkpoint, save_dir, tag=tag,
                                          client_state=client_state, save_latest=save_latest, **kwargs)

    def load_checkpoint(self, load_dir, tag=None, **kwargs) -> tuple[Any, dict]:
        """DeepSpeed's load of a complete tag only: ``tag`` if given (an incomplete one is an error),
        else ``latest`` if complete, else the newest complete tag, with a warning naming what was
        skipped. :class:`ds_chunkflow.deepspeed.checkpoint.CheckpointError` if there is none. What was loaded:
        ``self.chunkflow_loaded_checkpoint`` (tag, step, skipped)."""
        resolved = checkpoint.resolve_tag(load_dir, tag, device=self.device)
        self.chunkflow_loaded_checkpoint = resolved
        path, client_state = super().load_checkpoint(load_dir, tag=resolved.tag, **kwargs)
        if path is None:
            raise checkpoint.CheckpointError(f"DeepSpeed could not load checkpoint tag {resolved.tag} in {load_dir}")
        if self.chunkflow_sampler is not None:  # a plain DeepSpeed tag has none: a warning, the data from its start
            checkpoint.restore_sampler(self.chunkflow_sampler, client_state, SAMPLER_KEY, path, resolved)
        return path, client_state


class ChunkFlowEngine(ChunkFlowMixin, DeepSpeedEngine):
    def __init__(self, *args, chunkflow_resolve=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_recomputed_layers = enable_recompute(self.module, self.chunkflow_config.recompute_layers)
        # every rank probes (under ZeRO-3 the forward gathers parameters collectively); the
        # worst error over the data-parallel group decides, so all ranks refuse together
        group, device = self.data_parallel_group, self.device
        report = check_model(self.module, forward_fn=self,
                             reduce_max=lambda xs: all_reduce(xs, "max", group, device))
        self.guard_report = report
        logger.info("ds_chunkflow guard: %s passed (probe error %.1e <= %.0e) in %.2f s", report.model_class,
                    report.max_error, report.tolerance, report.seconds)
        self.sp_process_groups = self._sequence_parallel_groups()
        self.chunkflow_autotune = None  # chunk_size / keep_chunks: auto, measured on this engine before it is returned
        if chunkflow_resolve is not None:  # (ds_chunkflow.deepspeed.autotune.engine_resolver): the config is final
            self.chunkflow_config, self.chunkflow_autotune = chunkflow_resolve(self)

    def _sequence_parallel_groups(self) -> dict[tuple[int, ...], Any]:
        """One process group per aligned block of data-parallel ranks a long sample may be spread over
        (created collectively, on every rank, in the same order); refuses what cannot be exact."""
        sp = self.chunkflow_config.sequence_parallel
        if sp.max_size == 1:
            return {}
        error = None
        try:
            if sp.max_size > self.dp_world_size or self.dp_world_size % sp.max_size:
                raise SequenceParallelRefused(
                    f"chunkflow.sequence_parallel.max_size: {sp.max_size} must divide the data-parallel world "
                    f"size {self.dp_world_size}")
            check_heads(self.module.config, sp.max_size)
            if supported_mixers(self.module):
                raise SequenceParallelRefused(
                    f"chunkflow.sequence_parallel.max_size: {sp.max_size}: {type(self.module).__name__} has "
                    "recurrent token mixers (a hybrid model), whose state runs through the tokens in order; "
                    "sequence parallelism splits a chunk's tokens over ranks. Use max_size: 1")
        except SequenceParallelRefused as e:
            error = e
        agree_on_errors(error, group=self.data_parallel_group, device=self.device)
        import deepspeed.comm as dist
        import torch.distributed as tdist

        global_ranks = tdist.get_process_group_ranks(self.data_parallel_group)
        sizes = sp_sizes(self.dp_world_size, sp.max_size)
        return {ranks: SequenceParallelGroup(dist.new_group(ranks=[global_ranks[r] for r in ranks]), all_to_all_dim0)
                for ranks in sp_group_ranks(self.dp_world_size, sizes)}

    # ------------------------------------------------------------------ step
    def train_batch(self, sequences: Sequence[SequenceDict] | None = None, data_iter=None) -> torch.Tensor:
        """One optimizer step over a whole global batch; returns the global-batch loss on every rank."""
        if data_iter is not None:
            raise TypeError("ChunkFlowEngine.train_batch takes a list of sequences, not a data iterator")
        start = time.perf_counter()
        self.module.train()  # as DeepSpeed's PipelineEngine.train_batch: from_pretrained returns eval mode,
        # which would leave dropout and chunkflow.recompute_layers silently off
        sequences = self.next_global_batch() if sequences is None else sequences
        batch = self._plan_agreed(sequences, self.dp_world_size, self._cost_model(), self.data_parallel_group,
                                  sp_max_size=self.chunkflow_config.sequence_parallel.max_size)
        world = self.dp_world_size

        def backward(loss: torch.Tensor, boundary: bool) -> None:
            self.set_gradient_accumulation_boundary(boundary)
            self.backward(loss * world, scale_wrt_gas=False)

        zero3 = self.zero_optimization_stage() == 3
        runtime = ChunkRuntime.from_config(batch.sequences, self.chunkflow_config, self.device, batch.num_loss_tokens,
                                           sp_process_groups=self.sp_process_groups)
        executor = Executor(self, backward, runtime, model=self.module,
                            graph_hooks=Zero3LiveGraphs(self) if zero3 else GraphHooks())
        gathers = count_param_gathers() if zero3 else contextlib.nullcontext()
        planned = time.perf_counter()
        with hooks(self.module), gathers as gathered:
            stats = executor.run(batch.rank_plans[self._dp_rank()])
        ran = time.perf_counter()
        self.step()
        self.set_gradient_accumulation_boundary(None)
        stepped = time.perf_counter()
        # the step's device reads: the loss, and the counters, in one sum and one max over the ranks
        loss, stats.offloaded_bytes, stats.state_bytes_moved, stats.num_recomputes = all_reduce(
            [stats.loss.item(), stats.offloaded_bytes, stats.state_bytes_moved, stats.num_recomputes], "sum",
            self.data_parallel_group, self.device)
        peak_act, stats.peak_state_bytes, stats.mixer_state_bytes = all_reduce(
            [runtime.meter.peak, stats.peak_state_bytes, stats.mixer_state_bytes], "max", self.data_parallel_group,
            self.device)
        synced = time.perf_counter()
        metrics = step_metrics(batch, loss, synced - start, peak_rss_bytes(), stats, peak_act)
        metrics.update(time_breakdown(stats, plan=planned - start, executor=ran - planned, optimizer=stepped - ran,
                                      metrics_sync=synced - stepped))
        if zero3:  # this rank's parameter all-gathers in the chunk forwards and backwards (not the step)
            metrics.update(zero3_param_gathers=gathered.calls, zero3_param_gather_bytes=gathered.bytes)
        self._write_metrics(metrics)
        return torch.tensor(loss)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, data, batch_samples: int = EVAL_BATCH_SAMPLES) -> float:
        """Evaluation loss of ``data`` (a dataset with ``len`` and ``[i]``, or a list of sequences; the
        same on every rank): ``sum(CE over label tokens) / label tokens`` of the whole set.

        The chunked forward without backward: a long sample's chunks run in order with the K/V state
        of the ones before, without gradients, so any sample fits the memory a training chunk needs.
        Samples are spread over the data-parallel ranks by cost (sequence parallelism as in training)
        and the sums reduced in float64. Training state is untouched: the module's mode and the RNG
        are restored, the sampler is not read. Logged as ``eval/loss`` and ``eval/tokens`` through the
        monitor; ``self.last_eval`` holds ``{"loss", "tokens", "samples", "seconds"}``."""
        start = time.perf_counter()
        cf, group, world = self.chunkflow_config, self.data_parallel_group, self.dp_world_size
        num_samples = len(data)
        was_training, rng = self.module.training, get_rng()
        self.module.eval()
        loss_sum, tokens = 0.0, 0
        try:
            with hooks(self.module):
                for first in range(0, num_samples, batch_samples):
                    sequences = [data[i] for i in range(first, min(num_samples, first + batch_samples))]
                    tokens += count_loss_tokens(sequences)
                    batch = self._plan_agreed(sequences, world, self._cost_model(evaluation=True), group,
                                              sp_max_size=cf.sequence_parallel.max_size, evaluation=True)
                    runtime = ChunkRuntime.from_config(batch.sequences, cf, self.device,
                                                       sp_process_groups=self.sp_process_groups)
                    executor = Executor(self, no_backward, runtime, model=self.module)
                    loss_sum += executor.run(batch.rank_plans[self._dp_rank()]).loss.item()
        finally:
            self.module.train(was_training)
            set_rng(rng)
        if tokens == 0:
            raise ValueError(f"evaluate: the {num_samples} samples have no label tokens (every label is -100)")
        loss_sum, = all_reduce([loss_sum], "sum", group, self.device)
        loss = loss_sum / tokens
        self.last_eval = {"loss": loss, "tokens": float(tokens), "samples": float(num_samples),
                          "seconds": time.perf_counter() - start}
        if self.monitor.enabled and self.global_rank == 0:
            write_events(self.monitor, {k: v for k, v in self.last_eval.items() if k != "seconds"},
                         self.global_steps, self.global_samples, prefix="eval/")
        return loss

    def _dp_rank(self) -> int:
        import deepspeed.comm as dist

        return dist.get_rank(group=self.data_parallel_group)


def _make_sampler(dataset, cf: ChunkFlowConfig):
    from ds_chunkflow.data.sampler import GlobalBatchSampler

    d = cf.data
    if d.global_batch_size is None and d.global_batch_tokens is None:
        raise ValueError("chunkflow.data: set global_batch_size or global_batch_tokens to train from training_data")
    if hasattr(dataset, "make_sampler"):  # several sources (ds_chunkflow.data.mix.MixedDataset) bring their own
        return dataset.make_sampler(batch_size=d.global_batch_size, token_budget=d.global_batch_tokens,
                                    seed=d.seed, shuffle=d.shuffle)
    return GlobalBatchSampler(dataset.lengths, batch_size=d.global_batch_size, token_budget=d.global_batch_tokens,
                              seed=d.seed, shuffle=d.shuffle)
