"""The model guard: a model trains exactly under ChunkFlow, or it is refused before it trains.

ChunkFlow changes how tokens meet: packed sequences share a call, and a long sequence
is cut into dependent chunks whose only link is the K/V state of attention. Anything
else that mixes tokens along the sequence (a causal convolution, an SSM or linear-
attention recurrence, attention that does not go through transformers'
``AttentionInterface``, a position encoding that depends on the call's length) would
leak between packed sequences or lose its state at a chunk border, and the gradients
would be silently wrong. So, before the first step, and before anything reaches
``.grad``:

1. **static checks** (no forward): RoPE types that depend on the call's length, encoder-
   decoder models, modules that mix tokens outside attention (``Conv1d`` over time,
   SSM parameters ``A_log`` / ``dt_bias``) unless :mod:`ds_chunkflow.ops.mixers` has an adapter
   for the module's class (then its state is carried like the K/V state), and models that
   do not declare support for transformers' attention interface;
2. **a numerical probe**: a few random tokens laid out as ChunkFlow lays out a batch,
   two sequences packed into one chunk and one sequence split into three dependent
   chunks, are run through the model the way training runs them (eval mode, no grad)
   and compared with the model's own unchunked forward of each sequence::

       probe chunks   [a a a a a b b b] [c c c c c c c c] [c c c c c c c c] [c c c]
       reference      model(a), model(b), model(c)      (stock attention, one call each)

   A mixer the static checks do not know shows up as an O(1) relative difference in
   the logits; rounding is ~1e-15 in float64, ~1e-6 in float32, ~1e-2 in bf16. The
   tolerance (``PROBE_TOLERANCE``) sits between them.

The verdict is cached on the model object. In a process group every rank runs the
probe and the largest error decides for all, so every rank raises the same error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from ds_chunkflow.hf.model import OutputHead, base_model_of, final_hidden
from ds_chunkflow.ops.attention import MissingChunkContext
from ds_chunkflow.ops.mixers import SUPPORTED, is_supported, supported_mixers
from ds_chunkflow.plan.chunking import build_chunks
from ds_chunkflow.runtime.chunk import ChunkRuntime, Mode, hooks

PROBE_CHUNK = 8
PROBE_LENGTHS = (5, 3, 19)  # a + b packed into one chunk; c split into 8 + 8 + 3
PROBE_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}
_UNSUPPORTED_ROPE = ("dynamic", "longrope")
_CACHE_ATTR = "_ds_chunkflow_guard"
# Hybrids whose attention layers call transformers' AttentionInterface (read in the transformers 5.24
# and 5.25 sources) although the class does not declare ``_supports_attention_backend``; the probe checks them.
INTERFACE_VERIFIED = ("BambaForCausalLM", "JambaForCausalLM", "NemotronHForCausalLM", "Qwen3NextForCausalLM",
                      "FalconH1ForCausalLM", "ZambaForCausalLM", "Zamba2ForCausalLM")
# Models without attention (read in the same sources): their only token mixers are Mamba mixers / RWKV blocks, which
# :mod:`ds_chunkflow.ops.mixers` carries; the static scan refuses any other mixer, the probe checks the rest.
NO_ATTENTION = ("MambaForCausalLM", "Mamba2ForCausalLM", "FalconMambaForCausalLM", "RwkvForCausalLM")


class ModelRefused(NotImplementedError):
    """The model's chunked training would not equal its unchunked training."""


@dataclass(frozen=True)
class GuardReport:
    """What the guard measured: the probe's worst relative logit error and its cost."""

    model_class: str
    max_error: float
    tolerance: float
    seconds: float


def _refuse(model, reason: str, advice: str) -> ModelRefused:
    error = ModelRefused(f"ds_chunkflow cannot train {type(model).__name__} exactly: {reason}. {advice}")
    error.reason = reason  # the why alone (scripts/family_matrix.py shows it)
    return error


# ---------------------------------------------------------------------------- static checks
def sequence_mixers(model: torch.nn.Module) -> list[tuple[str, str]]:
    """``(module name, class name)`` of modules that mix tokens along the sequence outside attention."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv1d) and module.kernel_size[0] > 1:
            found.append((name, type(module).__name__))
        elif any(p in module._parameters for p in ("A_log", "dt_bias")):  # Mamba, Mamba2, gated delta net
            found.append((name, type(module).__name__))
    # report the outermost module (the mixer), not each of its parts
    outer = [(n, c) for n, c in found if not any(n != m and n.startswith(m + ".") for m, _ in found)]
    return outer


def unsupported_mixers(model: torch.nn.Module) -> list[tuple[str, str]]:
    """:func:`sequence_mixers` that no adapter of :mod:`ds_chunkflow.ops.mixers` covers (the module or one above it)."""
    adapted = [n for n, m in model.named_modules() if is_supported(m)]
    return [(n, c) for n, c in sequence_mixers(model) if not any(n == a or n.startswith(a + ".") for a in adapted)]


def _rope_types(config) -> set:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kinds = set()
    if isinstance(rope, dict):  # flat, or one entry per layer type
        kinds.add(rope.get("rope_type", rope.get("type")))
        kinds |= {v.get("rope_type") for v in rope.values() if isinstance(v, dict)}
    return kinds


def static_check(model: torch.nn.Module) -> None:
    """Refuses what can be seen without running the model. A ``peft.PeftModel`` is judged by the model
    inside it (:func:`ds_chunkflow.hf.model.base_model_of`), after PEFT's own checks
    (:func:`ds_chunkflow.hf.lora.check_peft`: no prompt learning; no quantised base without CUDA)."""
    from ds_chunkflow.hf.lora import check_peft, check_quantized

    check_peft(model)
    check_quantized(model)
    model = base_model_of(model)
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(model, "it is an encoder-decoder model", "ChunkFlow trains decoder-only causal LMs")
    bad = _rope_types(config) & set(_UNSUPPORTED_ROPE)
    if bad:
        raise _refuse(model, f"rope_type {sorted(bad)} depends on the longest position of each call",
                      "Use a static RoPE type (default, linear, llama3, yarn)")
    mixers = unsupported_mixers(model)
    if mixers:
        listed = ", ".join(f"{n} ({c})" for n, c in mixers[:3]) + (f" and {len(mixers) - 3} more"
                                                                   if len(mixers) > 3 else "")
        raise _refuse(model, f"it mixes tokens outside attention in {listed}; in a packed chunk that mixer would "
                      "leak from one sequence into the next, and its state would be lost at chunk borders",
                      "ChunkFlow carries the state of " + ", ".join(c.rsplit(".", 1)[1] for c in SUPPORTED)
                      + "; train this model without ChunkFlow (chunkflow.enabled: false)")
    if not (getattr(type(model), "_supports_attention_backend", False)
            or type(model).__name__ in INTERFACE_VERIFIED + NO_ATTENTION):
        raise _refuse(model, "its attention does not go through transformers' AttentionInterface "
                      f"({type(model).__name__}._supports_attention_backend is False), so ChunkFlow cannot "
                      "give it the chunk layout", "Use a model class that supports attn_implementation "
                      "selection, or train without ChunkFlow (chunkflow.enabled: false)")


# ---------------------------------------------------------------------------- numerical probe
def _probe_sequences(vocab_size: int) -> list[dict]:
    g = torch.Generator().manual_seed(1234)
    return [{"input_ids": torch.randint(0, vocab_size, (n,), generator=g),
             "labels": torch.full((n,), -100, dtype=torch.long)} for n in PROBE_LENGTHS]


def _hidden(model, holder: list) -> torch.Tensor:
    """The final hidden states the forward left in ``holder`` (:func:`final_hidden`), or the refusal saying why not."""
    if holder[0] is None:
        base = getattr(base_model_of(model), "base_model", None)
        raise _refuse(model, f"its forward never runs its base model {type(base).__name__} as a whole (it calls a "
                      "submodule of it directly, e.g. model.decoder), so ChunkFlow cannot read the final hidden states "
                      "its chunked loss starts from", "Train it without ChunkFlow (chunkflow.enabled: false)")
    return holder[0]


def _logits(out) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[0].double()


def _chunked_logits(forward_fn: Callable, model, sequences, device) -> list[torch.Tensor]:
    """Per sequence, its logits as ChunkFlow computes them."""
    layout = build_chunks([int(s["input_ids"].numel()) for s in sequences], PROBE_CHUNK)
    pieces: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(sequences))}
    runtime = ChunkRuntime(sequences, device, require_attention=False)  # the chunk runtime training uses
    head = OutputHead(model)
    chunks = [c for group in layout.groups for c in group] + list(layout.standalone)

    def call(inputs):
        def run(ctx):
            with final_hidden(model) as hidden:  # the loss's path: final hidden -> the model's head
                forward_fn(input_ids=inputs.input_ids, position_ids=inputs.position_ids, use_cache=False,
                           chunkflow=ctx, logits_to_keep=1)
            return ctx, hidden
        return run

    with hooks(model):
        for chunk in chunks:
            ctx, hidden = runtime.forward(chunk, call(runtime.inputs(chunk)), Mode.EVAL)
            if ctx.num_layer_calls == 0:
                raise _refuse(model, "its layers never called the attention interface",
                              "Its attention bypasses transformers' AttentionInterface; train it without ChunkFlow")
            logits = head(_hidden(model, hidden))[0].double()
            row = 0
            for s in chunk.segments:
                pieces[s.seq_index].append(logits[row:row + s.length])
                row += s.length
    return [torch.cat(pieces[i]) for i in range(len(sequences))]


def _check_head(model, error: float) -> None:
    """The loss's head path (final hidden -> lm_head -> extras) reproduces the model's own logits."""
    tol = PROBE_TOLERANCE.get(_param_dtype(model), 1e-4)
    if not error <= tol:
        raise _refuse(model, f"its forward does something after its decoder that ChunkFlow's chunked loss does not "
                      f"reproduce (its logits differ from lm_head(final hidden states) by {error:.1e}, relative, "
                      f"tolerance {tol:.0e})", "Add what its forward does to the logits to "
                      "ds_chunkflow.hf.model.FORWARD_EXTRAS, or train it without ChunkFlow")


def probe_error(model: torch.nn.Module, forward_fn: Callable | None = None) -> float:
    """Worst relative difference between ChunkFlow's logits and the model's own (no grad, eval mode)."""
    forward_fn = forward_fn or model
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    sequences = _probe_sequences(min(vocab, 1 << 15))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            chunked = _chunked_logits(forward_fn, model, sequences, device)
            worst = 0.0
            head = OutputHead(model)
            for seq, got in zip(sequences, chunked):
                ids = seq["input_ids"][None].to(device)
                with final_hidden(model) as hidden:
                    ref = _logits(forward_fn(input_ids=ids, use_cache=False,
                                             position_ids=torch.arange(ids.shape[1], device=device)[None]))
                scale = ref.abs().max().item() or 1.0
                _check_head(model, (head(_hidden(model, hidden))[0].double() - ref).abs().max().item() / scale)
                worst = max(worst, (got - ref).abs().max().item() / scale)
    finally:
        model.train(was_training)
    return worst


def _param_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def check_model(model: torch.nn.Module, forward_fn: Callable | None = None,
                reduce_max: Callable[[list[float]], list[float]] | None = None,
                allow_recurrent_mixers: bool = True) -> GuardReport:
    """Refuses (:class:`ModelRefused`) a model ChunkFlow cannot train exactly; returns the probe's report.

    ``forward_fn`` runs the model (a DeepSpeed engine under ZeRO-3, so parameters are
    gathered); ``reduce_max`` takes the max of a few floats over the process group, so
    every rank reaches the same verdict. ``allow_recurrent_mixers=False`` (the pipeline
    engine, whose stages do not carry mixer state) refuses hybrids even where an adapter
    exists. Cached on ``model``.
    """
    if not allow_recurrent_mixers and supported_mixers(model):
        name, m = supported_mixers(model)[0]
        raise _refuse(model, f"it has recurrent sequence mixers ({name}: {type(m).__name__}) and the pipeline "
                      "engine does not carry their state across chunks",
                      "Train it with the data-parallel engine (no pipeline section)")
    cached = vars(model).get(_CACHE_ATTR)  # not getattr: a PeftModel would find its inner model's verdict
    if cached is not None:
        return cached
    reduce_max = reduce_max or (lambda xs: xs)
    start = time.perf_counter()
    error: BaseException | None = None
    err = 0.0
    try:
        static_check(model)
        err = probe_error(model, forward_fn)
    except ModelRefused as e:
        error, err = e, float("inf")
    except MissingChunkContext as e:
        error, err = _refuse(model, str(e), "ChunkFlow needs every attention call to receive the model's "
                             "forward kwargs; train it without ChunkFlow (chunkflow.enabled: false)"), float("inf")
    except Exception as e:  # the model failed on the chunk layout: that is a refusal too
        error, err = _refuse(model, f"its forward failed on a chunked probe batch ({type(e).__name__}: {e})",
                             "If the message names an unsupported feature, turn it off in the model config or "
                             "train without ChunkFlow"), float("inf")
        error.__cause__ = e
    if err != err:  # NaN
        err = float("inf")
    worst, = reduce_max([err])
    tol = PROBE_TOLERANCE.get(_param_dtype(model), 1e-4)
    if error is not None:
        raise error
    if worst == float("inf"):
        raise ModelRefused(f"ds_chunkflow cannot train {type(model).__name__} exactly: the guard failed on another "
                           "rank (see its error)")
    if worst > tol:
        raise _refuse(model, f"its chunked forward differs from its own forward by {worst:.2e} (relative, "
                      f"tolerance {tol:.0e} for {_param_dtype(model)}) on a probe batch of packed and dependent "
                      "chunks, so some layer mixes tokens in a way ChunkFlow does not carry across chunks",
                      "Train it without ChunkFlow (chunkflow.enabled: false)")
    name = type(model).__name__
    if base_model_of(model) is not model:  # a PeftModel: the wrapper and the model it trains
        name = f"{name}({type(base_model_of(model)).__name__})"
    report = GuardReport(name, worst, tol, time.perf_counter() - start)
    object.__setattr__(model, _CACHE_ATTR, report)
    return report


__all__ = ["GuardReport", "ModelRefused", "check_model", "probe_error",
           "sequence_mixers", "static_check", "unsupported_mixers"]
