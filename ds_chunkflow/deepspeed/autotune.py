"""``chunk_size: auto`` / ``keep_chunks: auto``: the largest chunks that fit a per-rank memory budget.

Predicted peak of one rank, in bytes, for chunk size ``C`` and ``K`` kept chunks (``L``: the
longest sample the run can see; every term is computed from the same inputs on every rank)::

    static      parameters + gradients + optimizer state this rank holds (ZeRO-partitioned)
    activations held(K) * act(C)             act(C) = a0 + a1*C + a2*C^2, measured at start-up
    backward    full(C) / layers (x2 with recompute_layers: the recomputed layer's activations too): one
                layer's activation gradients during a backward; full(C) = act(C) without layer recompute
    kv_state    L * (kv + kv_grad)            the longest sample's K/V state and its float32 gradient
    loss_piece  3 * min(C, piece) * vocab * 4 one piece's float32 logits, softmax and their gradient
    attention   L * prefix_grad               one layer's prefix K/V gradient in a chunk's backward

    need = sum of the terms;  a choice fits when need * (1 + margin) <= budget

``act`` is calibrated by :func:`measure_profile`: three probe chunks (256, 512, 1024 tokens) run
forward through the engine with :class:`~ds_chunkflow.runtime.memory.ActivationMeter` counting what
autograd saves (exact, allocator-independent), and one dependent probe gives the K/V state per
token. ``held(K)`` is K, or every chunk of the longest sample when offloaded activations stay in the
same memory (``offload.activations: far`` on a CPU device). The K/V terms drop out when the state
lives on the CPU of a GPU run (``offload.kv_state_min_tokens``).

:func:`choose` (pure) walks chunk sizes from the largest useful power of two down to ``FLOOR``:
the largest C that fits with K = 1 (or the fixed K), then the largest K that fits at that C (at most
the longest sample's chunk count). Nothing fits: :class:`AutotuneError` naming the budget and the
smallest need, before anything trains.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ds_chunkflow.config import ChunkFlowConfig, ConfigError
from ds_chunkflow.deepspeed.deepspeed_adapter import client_optimizer, full_numel, held_tensor

logger = logging.getLogger(__name__)

GIB = 1 << 30
FLOOR = 256  # smallest chunk size considered: below it per-call overheads dominate
PROBE_TOKENS = (256, 512, 1024)
MARGIN = 0.35  # allocator slack and what the model does not save through autograd (fragmentation, workspaces);
# 0.15 let a fresh-clone CI run grow 43.5 MiB against a 42 MiB budget (35 MiB predicted)
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq in float32, per parameter


class AutotuneError(ConfigError):
    """No chunk_size / keep_chunks fits ``chunkflow.memory_budget_gib`` (or auto cannot be resolved)."""


@dataclass(frozen=True)
class MemoryProfile:
    """What one rank's peak is made of, per unit (bytes); see the module docstring."""

    static_bytes: int
    act_coeffs: tuple[float, float, float]  # a0, a1, a2 of act(C) = a0 + a1*C + a2*C^2
    kv_bytes_per_token: float  # K/V state + its gradient buffer, per token of the sample
    vocab_size: int
    loss_piece_tokens: int
    prefix_grad_bytes_per_token: float = 0.0
    num_layers: int = 1
    backward_coeffs: tuple[float, float, float] | None = None  # of backward(C); None: act(C) / num_layers
    static_terms: dict[str, int] = field(default_factory=dict)  # parameters, gradients, optimizer (printed)

    def activations(self, chunk_size: int) -> int:
        a0, a1, a2 = self.act_coeffs
        return max(0, math.ceil(a0 + a1 * chunk_size + a2 * chunk_size * chunk_size))

    def backward(self, chunk_size: int) -> int:
        if self.backward_coeffs is None:
            return math.ceil(self.activations(chunk_size) / max(1, self.num_layers))
        b0, b1, b2 = self.backward_coeffs
        return max(0, math.ceil(b0 + b1 * chunk_size + b2 * chunk_size * chunk_size))


@dataclass(frozen=True)
class Workload:
    """What the data asks of a rank: the longest sample, and whether far activations stay in memory."""

    longest: int
    offload_in_same_memory: bool = False  # offload.activations: far on a CPU device: all chunks are held
    kv_on_device: bool = True  # False: the state of the longest sample lives on the host of a GPU run


@dataclass(frozen=True)
class Prediction:
    chunk_size: int
    keep_chunks: int
    terms: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.terms.values())


@dataclass(frozen=True)
class Choice:
    """The resolved values and why: the prediction's terms against the budget."""

    chunk_size: int
    keep_chunks: int
    prediction: Prediction
    budget_bytes: int
    margin: float
    longest: int

    def summary(self) -> str:
        terms = ", ".join(f"{k} {v / GIB:.3f}" for k, v in self.prediction.terms.items())
        return (f"chunk_size {self.chunk_size}, keep_chunks {self.keep_chunks}: predicted peak "
                f"{self.prediction.total / GIB:.3f} GiB (+{self.margin:.0%} margin) <= budget "
                f"{self.budget_bytes / GIB:.3f} GiB; terms (GiB): {terms}; longest sample {self.longest} tokens")


def predict(profile: MemoryProfile, work: Workload, chunk_size: int, keep_chunks: int) -> Prediction:
    """The predicted per-rank peak of ``(chunk_size, keep_chunks)`` term by term."""
    num_chunks = max(1, -(-work.longest // chunk_size))
    # K chunks hold activations: K of a long sample's, or K standalone chunks sharing one backward
    # (plan.schedule.join_backwards) however short the samples are
    held = num_chunks if work.offload_in_same_memory else keep_chunks
    dependent = work.longest > chunk_size and work.kv_on_device
    terms = dict(profile.static_terms) if profile.static_terms else {"static": profile.static_bytes}
    terms["activations"] = held * profile.activations(chunk_size)
    terms["backward"] = profile.backward(chunk_size)
    terms["kv_state"] = math.ceil(work.longest * profile.kv_bytes_per_token) if dependent else 0
    terms["loss_piece"] = 3 * min(chunk_size, profile.loss_piece_tokens) * profile.vocab_size * 4
    terms["attention"] = math.ceil(work.longest * profile.prefix_grad_bytes_per_token) if dependent else 0
    return Prediction(chunk_size, keep_chunks, terms)


def candidate_chunk_sizes(longest: int, floor: int = FLOOR) -> list[int]:
    """Powers of two from the first one holding the longest sample down to ``floor``, largest first."""
    top = max(floor, 1 << max(0, (longest - 1).bit_length()))
    sizes, c = [], top
    while c >= floor:
        sizes.append(c)
        c //= 2
    return sizes


def choose(profile: MemoryProfile, work: Workload, budget_bytes: int, chunk_size: int | None = None,
           keep_chunks: int | None = None, margin: float = MARGIN, floor: int = FLOOR) -> Choice:
    """The largest chunk size (then K) whose predicted peak, plus ``margin``, fits ``budget_bytes``.

    ``chunk_size`` / ``keep_chunks``: a fixed value (not auto). Raises :class:`AutotuneError` naming
    the budget and the smallest need when nothing fits."""
    fits = lambda p: p.total * (1 + margin) <= budget_bytes  # noqa: E731
    sizes = [chunk_size] if chunk_size is not None else candidate_chunk_sizes(work.longest, floor)
    smallest = None
    for c in sizes:
        first = predict(profile, work, c, keep_chunks or 1)
        smallest = first if smallest is None or first.total < smallest.total else smallest
        if not fits(first):
            continue
        best = first
        if keep_chunks is None:
            for k in range(2, max(1, -(-work.longest // c)) + 1):
                p = predict(profile, work, c, k)
                if not fits(p):
                    break
                best = p
        return Choice(c, best.keep_chunks, best, budget_bytes, margin, work.longest)
    assert smallest is not None
    raise AutotuneError(
        f"chunkflow.memory_budget_gib: {budget_bytes / GIB:.3f} GiB per rank is too small: the smallest choice "
        f"(chunk_size {smallest.chunk_size}, keep_chunks {smallest.keep_chunks}) needs "
        f"{smallest.total * (1 + margin) / GIB:.3f} GiB with the {margin:.0%} margin ("
        + ", ".join(f"{k} {v / GIB:.3f}" for k, v in smallest.terms.items())
        + f" GiB; longest sample {work.longest} tokens); raise the budget, shard more (ZeRO), or offload")


# ----------------------------------------------------------------------------- inputs from the run
def fit_activations(tokens: Sequence[int], measured: Sequence[int]) -> tuple[float, float, float]:
    """``(a0, a1, a2)`` of ``a0 + a1*C + a2*C^2`` through the probes (least squares); a negative curvature
    (noise) falls back to the line through the two largest probes, so no prediction bends down."""
    x = torch.tensor([float(t) for t in tokens], dtype=torch.float64)
    y = torch.tensor([float(m) for m in measured], dtype=torch.float64)
    a = torch.stack([torch.ones_like(x), x, x * x], dim=1)
    coeffs = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1).tolist()
    if coeffs[2] >= 0 and len(tokens) >= 3:
        return coeffs[0], coeffs[1], coeffs[2]
    slope = (y[-1] - y[-2]) / (x[-1] - x[-2]) if len(tokens) >= 2 else y[-1] / x[-1]
    slope = max(float(slope), 0.0)
    return float(y[-1] - slope * x[-1]), slope, 0.0


def longest_sample(dataset, cf: ChunkFlowConfig) -> int:
    """The longest sample the run can meet: the dataset's ``lengths`` (capped by ``max_seq_len``), else
    ``max_seq_len``; neither: :class:`AutotuneError`."""
    lengths = getattr(dataset, "lengths", None)
    if lengths is not None and len(lengths):
        longest = int(max(lengths))
        return min(longest, cf.max_seq_len) if cf.max_seq_len is not None else longest
    if cf.max_seq_len is not None:
        return cf.max_seq_len
    raise AutotuneError("chunkflow.chunk_size / keep_chunks: auto needs the longest sample: pass training_data "
                        "(a dataset with `lengths`) or set chunkflow.max_seq_len")


def optimizer_state_bytes_per_param(optimizer) -> int:
    """Bytes of optimizer state per trainable parameter: 8 for Adam-like (two float32 moments),
    4 with momentum, else 0. ``optimizer``: the torch optimizer DeepSpeed wraps."""
    if optimizer is None:
        return 0
    name = type(optimizer).__name__.lower()
    if any(s in name for s in ("adam", "lamb", "lion")):
        return 4 if "lion" in name else ADAM_STATE_BYTES
    momentum = any(g.get("momentum", 0) for g in getattr(optimizer, "param_groups", []))
    return 4 if momentum else 0


def static_terms(params: Sequence[torch.nn.Parameter], zero_stage: int, dp_world: int, optimizer,
                 mixed_precision: bool) -> dict[str, int]:
    """Parameters, gradients, optimizer state (with float32 master copies) held by one rank.

    Parameters count what is allocated here (a ZeRO-3 partition: :func:`held_tensor`); gradients are full
    at stages 0-1 and a 1/W float32 partition from stage 2; optimizer state is 1/W from stage 1."""
    local = full = 0
    elt = 4
    for p in params:
        local += held_tensor(p).numel() * p.element_size()
        if p.requires_grad:
            full += full_numel(p)
            elt = p.element_size()
    shard = dp_world if zero_stage >= 1 else 1
    grads = full * 4 // dp_world if zero_stage >= 2 else full * elt
    master = full * 4 // shard if mixed_precision and elt < 4 else 0
    state = full * optimizer_state_bytes_per_param(optimizer) // shard
    return {"parameters": local, "gradients": grads, "optimizer": state + master}


# ----------------------------------------------------------------------------- the start-up probe
def _probe_run(forward_fn, model, device, tokens: int, chunk_size: int, keep_chunks: int, vocab: int,
               cf: ChunkFlowConfig):
    """One sequence of ``tokens`` random ids through the executor, forward only (graphs dropped, no
    ``.grad`` touched); returns ``(activation meter peak, executor stats)``."""
    from ds_chunkflow.runtime.batch_plan import plan_batch
    from ds_chunkflow.runtime.chunk import ChunkRuntime, hooks
    from ds_chunkflow.runtime.executor import Executor
    from ds_chunkflow.runtime.memory import ActivationMeter

    ids = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(tokens))
    batch = plan_batch([{"input_ids": ids, "labels": ids.clone()}], chunk_size=chunk_size, keep_chunks=keep_chunks)
    meter = ActivationMeter()
    runtime = ChunkRuntime.from_config(batch.sequences, cf, device, batch.num_loss_tokens, chunk_size=chunk_size,
                                       meter=meter)
    with hooks(model):
        stats = Executor(forward_fn, lambda loss, boundary: None, runtime, model=model).run(batch.rank_plans[0])
    return meter.peak, stats


def measure_profile(forward_fn, model: torch.nn.Module, device: torch.device, cf: ChunkFlowConfig,
                    static: dict[str, int], reduce_max=lambda xs: xs) -> MemoryProfile:
    """Calibrates ``act(C)`` and the K/V bytes per token on this model as the run will train it
    (its dtype, ``recompute_layers``, attention kernels); ``reduce_max`` makes every rank agree."""
    config = getattr(model, "hf_config", None) or model.config
    vocab = int(config.vocab_size)
    was_training = model.training
    recompute = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    try:
        model.train()  # dropout masks are saved tensors too; recompute_layers only checkpoints in training mode
        acts = [_probe_run(forward_fn, model, device, t, t, 1, vocab, cf)[0] for t in PROBE_TOKENS]
        half = PROBE_TOKENS[0]
        _, stats = _probe_run(forward_fn, model, device, 2 * half, half, 2, vocab, cf)
        if recompute:  # what a layer holds without checkpointing: its backward recomputes exactly that
            model.eval()
            full = [_probe_run(forward_fn, model, device, t, t, 1, vocab, cf)[0] for t in PROBE_TOKENS]
        else:
            full = acts
    finally:
        model.train(was_training)
    dtype = next(model.parameters()).dtype
    elt = torch.empty((), dtype=dtype).element_size()
    kv = stats.peak_state_bytes / (2 * half)  # buffers for the whole sample, no gradient yet (no backward)
    kv_with_grad = kv * (1 + max(4, elt) / elt)  # the gradient buffer is float32 (float64 for float64)
    heads = int(getattr(config, "num_attention_heads", 1))
    head_dim = int(getattr(config, "head_dim", None) or getattr(config, "hidden_size", heads) // heads)
    n = len(PROBE_TOKENS)
    agreed = reduce_max([float(a) for a in acts + full] + [kv_with_grad])
    acts, full, kv_with_grad = agreed[:n], agreed[n:2 * n], agreed[-1]
    layers = int(getattr(config, "num_hidden_layers", 1) or 1)
    per_layer = [x * (2 if recompute else 1) / layers for x in full]
    return MemoryProfile(static_bytes=sum(static.values()), act_coeffs=fit_activations(PROBE_TOKENS, acts),
                         kv_bytes_per_token=kv_with_grad, vocab_size=vocab, loss_piece_tokens=cf.loss_piece_tokens,
                         prefix_grad_bytes_per_token=2 * heads * head_dim * max(4, elt), static_terms=static,
                         num_layers=layers, backward_coeffs=fit_activations(PROBE_TOKENS, per_layer))


def needs_autotune(cf: ChunkFlowConfig | None) -> bool:
    return cf is not None and "auto" in (cf.chunk_size, cf.keep_chunks)


def resolve_auto(engine, cf: ChunkFlowConfig, dataset=None) -> tuple[ChunkFlowConfig, Choice]:
    """``cf`` with ``auto`` resolved, measured on ``engine`` (a DeepSpeed engine being built: its module,
    optimizer and ZeRO stage are set up; collective over its data-parallel group), and the :class:`Choice`.

    Reads nothing from and writes nothing to the engine's ChunkFlow config: the engine is given the
    returned config as its own before its constructor returns (:func:`engine_resolver`), so the config
    an engine holds never changes after it is built. Logs the choice on rank 0."""
    from ds_chunkflow.deepspeed.distributed import all_reduce

    group, device = engine.data_parallel_group, engine.device
    reduce_max = lambda xs: all_reduce(xs, "max", group, device)  # noqa: E731
    mixed = bool(engine.bfloat16_enabled() or engine.fp16_enabled())
    static = static_terms(list(engine.module.parameters()), engine.zero_optimization_stage(), engine.dp_world_size,
                          client_optimizer(engine), mixed)
    static = dict(zip(static, (int(v) for v in reduce_max([float(v) for v in static.values()]))))
    profile = measure_profile(engine, engine.module, device, cf, static, reduce_max)
    longest = longest_sample(dataset, cf)
    kv_offloaded = cf.offload.kv_state_min_tokens is not None and longest >= cf.offload.kv_state_min_tokens
    work = Workload(longest, offload_in_same_memory=cf.offload.activations == "far" and device.type == "cpu",
                    kv_on_device=not (kv_offloaded and torch.device(device).type != "cpu"))
    choice = choose(profile, work, int(cf.memory_budget_gib * GIB),
                    chunk_size=None if cf.chunk_size == "auto" else cf.chunk_size,
                    keep_chunks=None if cf.keep_chunks == "auto" else cf.keep_chunks)
    if engine.global_rank == 0:
        logger.info("ds_chunkflow autotune: %s", choice.summary())
    return cf.model_copy(update={"chunk_size": choice.chunk_size, "keep_chunks": choice.keep_chunks}), choice


def engine_resolver(cf: ChunkFlowConfig, dataset=None) -> Callable | None:
    """What :class:`~ds_chunkflow.deepspeed.engine.ChunkFlowEngine` calls at the end of its constructor
    (``chunkflow_resolve``) to get its final config and :class:`Choice` (``engine.chunkflow_autotune``):
    :func:`resolve_auto` of ``cf``; None when nothing is ``auto``."""
    return functools.partial(resolve_auto, cf=cf, dataset=dataset) if needs_autotune(cf) else None
