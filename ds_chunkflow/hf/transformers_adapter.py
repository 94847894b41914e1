"""Every place ds_chunkflow reaches into transformers beyond a model's documented ``forward``.

Each touch point says which transformers releases it was read from (5.24.0 and 5.25.0: the two ends of
the range ``setup.cfg`` declares; ``.ci/constraints.txt`` and ``.ci/constraints-newest.txt`` install them).
:func:`missing_names` lists the touch points an installed release lacks, and
``tests/hf/test_transformers_adapter.py`` fails on any. Where the two releases differ the code dispatches here.

1. Attention: ``transformers.AttentionInterface.register(name, fn)`` and ``config._attn_implementation``
   (:mod:`ds_chunkflow.ops.attention`); ``PreTrainedModel._supports_attention_backend`` (:mod:`ds_chunkflow.hf.guard`).
   Public extension point, same in 5.24 and 5.25.
2. Mixer caches (:class:`ds_chunkflow.ops.mixers._StateCache`, a real ``transformers.cache_utils.Cache``
   subclass): the cache methods a recurrent mixer calls on a training (multi-token) forward,
   :data:`MIXER_CACHE_METHODS` per release. 5.25 added ``get_recurrent_states_to_keep`` (the Mamba2 /
   gated-delta scans ask how many per-token states to keep for speculative decoding; ChunkFlow keeps none)
   and ``increase_count`` (single-token decode only). :func:`mixer_cache_calls` reads which ones an
   installed model module calls, so a release that adds another is caught by the test, not by a refusal.
3. Functions swapped inside model modules for a packed chunk (:data:`SWAPPED_FUNCTIONS`, read in the
   modeling files of LFM2, LFM2-MoE, Qwen3-Next, Granite-4 hybrid, Bamba, NemotronH, Falcon-H1, Zamba, Zamba2,
   Jamba, Mamba, Mamba2, FalconMamba, RWKV): the causal conv and the
   scans, called by their module-global names. 5.25 moved each mixer's conv (and the Mamba2 scan) into a
   module function taking the cache (``causal_conv1d_forward``, ``mamba2_scan_forward``), which still calls
   ``causal_conv1d_fn`` / ``mamba2_chunk_scan`` by module-global name, and with the ``kernels`` package
   installed (a dependency of 5.25) every ``use_kernel_forward_from_hub`` function is a kernels ``Func``
   module whose signature is ``(*args, **kwargs)``: :func:`plain_function` finds the Python function behind it.
4. ``transformers.utils.chat_template_utils.render_jinja_template`` (:mod:`ds_chunkflow.data.chat_labels`:
   the chat template rendered with generation spans).
5. The gradient-checkpointing layer switch: ``transformers.modeling_layers.GradientCheckpointingLayer`` and
   its ``gradient_checkpointing`` / ``_gradient_checkpointing_func`` attributes (:mod:`ds_chunkflow.hf.model`,
   :mod:`ds_chunkflow.ops.mixers`; also imported by ``lora.py``, which is left as is).
6. ``transformers.integrations.HfDeepSpeedConfig`` kept alive on the model for ZeRO-3 loading
   (:mod:`ds_chunkflow.hf.loading`).
7. The pipeline wrapper's reading of a decoder (:mod:`ds_chunkflow.pipeline.model`): ``model.model``'s
   ``embed_tokens`` / ``layers`` / ``norm`` / ``rotary_emb``, ``config.layer_types``, each decoder layer called
   with ``position_embeddings``; it refuses a model without them by name (checked per model, not here: the
   pipeline tests are in the distributed tier, which only the pinned environment runs).
8. Zamba / Zamba2 shared attention blocks (:data:`SHARED_ATTENTION_LAYERS`): built with one ``layer_idx`` for
   every hybrid layer; :mod:`ds_chunkflow.ops.mixers` gives each its layer's index for a chunked step.
9. Blocks whose state lives outside the cache (read in 5.24 and 5.25, same code): RecurrentGemma's
   ``RecurrentGemmaRecurrentBlock`` (its ``conv_1d`` and ``rg_lru`` submodules, ``rg_lru.recurrent_states``,
   reset where ``position_ids`` is 0) and RWKV's ``RwkvBlock`` (``attention`` / ``feed_forward`` with their
   ``time_shift``, the five-tensor ``state`` list indexed by ``layer_id``, ``rwkv_linear_attention_cpu``:
   :data:`CALLED_FUNCTIONS`; the raw forward behind ``GradientCheckpointingLayer``'s wrapper, ``forward.__wrapped__``).
   Exercised by ``tests/ops/test_mixers.py``, not listed by :func:`missing_names`.

Not touch points: a model's ``forward`` kwargs (``position_ids``, ``use_cache``, ``logits_to_keep``, and
``chunkflow``, threaded to attention as the ``AttentionInterface`` contract says), ``from_pretrained`` and
``PreTrainedTokenizerBase``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from importlib.metadata import version

READ_FROM = ("5.24.0", "5.25.0")

# 2. Cache methods a mixer calls on a multi-token forward, per release (read from the six modeling files).
MIXER_CACHE_METHODS = {
    (5, 24): ("get_conv_state", "get_recurrent_state", "update_conv_state", "update_recurrent_state",
              "is_recording_past"),
    (5, 25): ("get_conv_state", "get_recurrent_state", "update_conv_state", "update_recurrent_state",
              "is_recording_past", "get_recurrent_states_to_keep", "increase_count"),
}
# the attention cache's methods the decoder (not the mixer) calls: ChunkFlow never passes a cache there
_NOT_MIXER_CALLS = {"update", "get_seq_length", "get_mask_sizes"}

# 3. model module -> the functions ds_chunkflow.ops.mixers swaps there (same names in 5.24 and 5.25)
SWAPPED_FUNCTIONS = {
    "transformers.models.lfm2.modeling_lfm2": ("causal_conv1d_fn",),
    "transformers.models.qwen3_next.modeling_qwen3_next": ("causal_conv1d_fn", "torch_chunk_gated_delta_rule"),
    "transformers.models.granitemoehybrid.modeling_granitemoehybrid": ("causal_conv1d_fn", "mamba2_chunk_scan"),
    "transformers.models.bamba.modeling_bamba": ("causal_conv1d_fn", "mamba2_chunk_scan"),
    "transformers.models.nemotron_h.modeling_nemotron_h": ("causal_conv1d_fn", "mamba2_chunk_scan"),
    "transformers.models.jamba.modeling_jamba": ("causal_conv1d_fn", "mamba_selective_scan"),
    "transformers.models.lfm2_moe.modeling_lfm2_moe": ("causal_conv1d_fn",),
    "transformers.models.falcon_h1.modeling_falcon_h1": ("causal_conv1d_fn", "mamba2_chunk_scan"),
    "transformers.models.zamba2.modeling_zamba2": ("causal_conv1d_fn", "mamba2_chunk_scan"),
    "transformers.models.mamba2.modeling_mamba2": ("causal_conv1d_fn", "mamba2_chunk_scan"),
    "transformers.models.zamba.modeling_zamba": ("causal_conv1d_fn", "mamba_selective_scan"),
    "transformers.models.mamba.modeling_mamba": ("causal_conv1d_fn", "mamba_selective_scan"),
    "transformers.models.falcon_mamba.modeling_falcon_mamba": ("causal_conv1d_fn", "mamba_selective_scan"),
    "transformers.models.rwkv.modeling_rwkv": ("rwkv_linear_attention",),
}

# 3b. model module -> functions ds_chunkflow.ops.mixers calls there (not swapped): RWKV's torch WKV recurrence, run
# instead of the CUDA kernel where a carried state needs its gradient (the kernel's backward returns none).
CALLED_FUNCTIONS = {"transformers.models.rwkv.modeling_rwkv": ("rwkv_linear_attention_cpu",)}

# 8. Shared attention blocks (Zamba, Zamba2): one attention module per hybrid layer, tied weights, all built with the
# same ``layer_idx`` (None / -1; transformers passes the layer's index as a forward argument, which the attention
# interface never sees). ChunkFlow keys its K/V state by ``module.layer_idx``, so for a chunked step each hybrid layer's
# attention gets that layer's index: hybrid layer class -> (attribute of its attention block, of its Mamba layer).
# Read from 5.24 and 5.25.
SHARED_ATTENTION_LAYERS = {
    "transformers.models.zamba.modeling_zamba.ZambaHybridLayer": ("shared_transf", "mamba_decoder"),
    "transformers.models.zamba2.modeling_zamba2.Zamba2HybridLayer": ("shared_transformer", "mamba_decoder"),
}

# 1, 4, 5, 6: module -> names ds_chunkflow imports or reads from it
IMPORTED_NAMES = {
    "transformers": ("AttentionInterface", "PreTrainedModel"),
    "transformers.cache_utils": ("Cache",),
    "transformers.utils.chat_template_utils": ("render_jinja_template",),
    "transformers.modeling_layers": ("GradientCheckpointingLayer",),
    "transformers.integrations": ("HfDeepSpeedConfig",),
}


def installed_version() -> tuple[int, int]:
    major, minor = version("transformers").split(".")[:2]
    return int(major), int(minor)


def mixer_cache_methods() -> tuple[str, ...]:
    """The cache methods the installed release's mixers call (the newest listed for a newer release)."""
    known = sorted(MIXER_CACHE_METHODS)
    chosen = [v for v in known if v <= installed_version()] or known[:1]
    return MIXER_CACHE_METHODS[chosen[-1]]


def mixer_cache_calls(module_name: str) -> set[str]:
    """Methods the model module calls on ``cache`` / ``cache_params`` (from its source)."""
    source = inspect.getsource(importlib.import_module(module_name))
    return set(re.findall(r"\bcache(?:_params)?\.([a-z_]+)\(", source)) - _NOT_MIXER_CALLS


def plain_function(fn):
    """The Python function behind a model-module function: itself, or what a kernels ``Func`` module calls."""
    forward = getattr(type(fn), "forward", None)
    if "func" in getattr(getattr(forward, "__code__", None), "co_freevars", ()):  # kernels' Func.forward
        return inspect.getclosurevars(forward).nonlocals["func"]
    return fn


def signature(fn) -> inspect.Signature:
    """``fn``'s signature through wrappers (``__wrapped__``) and kernels ``Func`` modules."""
    while True:
        inner = plain_function(fn)
        inner = getattr(inner, "__wrapped__", inner)
        if inner is fn:
            return inspect.signature(fn)
        fn = inner


def shared_attention_indices(model) -> list[tuple[object, int]]:
    """``(attention module, index of its hybrid layer)`` for each shared attention block of ``model``
    (:data:`SHARED_ATTENTION_LAYERS`); empty for any other model."""
    found = []
    for module in model.modules():
        names = SHARED_ATTENTION_LAYERS.get(f"{type(module).__module__}.{type(module).__qualname__}")
        if names is not None:
            block, mamba = (getattr(module, n) for n in names)
            found.append((block.self_attn, mamba.layer_idx))
    return found


def render_jinja_template(*args, **kwargs):
    from transformers.utils.chat_template_utils import render_jinja_template as render

    return render(*args, **kwargs)


def gradient_checkpointing_layer():
    from transformers.modeling_layers import GradientCheckpointingLayer

    return GradientCheckpointingLayer


def register_attention(name: str, fn) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)


def hf_deepspeed_config():
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig


def cache_base():
    from transformers.cache_utils import Cache

    return Cache


def missing_names() -> list[str]:
    """The touch points above that the installed transformers lacks (empty when all are there)."""
    missing = []
    for module_name, names in [*IMPORTED_NAMES.items(), *SWAPPED_FUNCTIONS.items(), *CALLED_FUNCTIONS.items()]:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name)
            continue
        missing += [f"{module_name}.{n}" for n in names if not hasattr(module, n)]
    for path in SHARED_ATTENTION_LAYERS:
        module_name, cls = path.rsplit(".", 1)
        if not hasattr(importlib.import_module(module_name), cls):
            missing.append(path)
    cache = cache_base()
    missing += [f"Cache.{n}" for n in mixer_cache_methods() if not hasattr(cache, n)]
    layer = gradient_checkpointing_layer()
    if "gradient_checkpointing" not in vars(layer):
        missing.append("GradientCheckpointingLayer.gradient_checkpointing")
    from transformers import PreTrainedModel

    if not hasattr(PreTrainedModel, "_supports_attention_backend"):
        missing.append("PreTrainedModel._supports_attention_backend")
    if "_gradient_checkpointing_func" not in inspect.getsource(PreTrainedModel):  # where the layers get it
        missing.append("GradientCheckpointingLayer._gradient_checkpointing_func")
    from ds_chunkflow.ops.mixers import _StateCache

    for module_name in SWAPPED_FUNCTIONS:  # what the installed mixers call, our cache must have
        missing += [f"_StateCache.{n} (called in {module_name})" for n in sorted(mixer_cache_calls(module_name))
                    if n not in vars(_StateCache)]
    return missing


# ----------------------------------------------------------------------------- the touch points as data
# For tests/test_layering.py: every transformers name above that is not public API, the releases it was read
# from, and the ds_chunkflow files that may touch it. Outside this module, a file may import transformers'
# top-level names only (``from transformers import X``); submodules (``transformers.models.*``,
# ``modeling_layers``, ``cache_utils``, ``integrations``, ``utils.*``) are reached through the functions above
# (``ds_chunkflow.hf.lora`` too: :func:`gradient_checkpointing_layer`).
TRANSFORMERS_ADAPTER = "ds_chunkflow/hf/transformers_adapter.py"
PRIVATE_NAMES = {  # attribute -> (touch point, releases read from, files that touch it besides this one)
    "_attn_implementation": (1, READ_FROM, ("ds_chunkflow/ops/attention.py",)),
    "_supports_attention_backend": (1, READ_FROM, ("ds_chunkflow/hf/guard.py",)),
    "_gradient_checkpointing_func": (5, READ_FROM, ("ds_chunkflow/hf/model.py", "ds_chunkflow/ops/mixers.py")),
}
PUBLIC_MODULES = ("transformers",)  # modules any ds_chunkflow file may import names from
