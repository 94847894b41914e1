"""Recurrent sequence mixers under ChunkFlow: short convolutions, Mamba2 SSD, Mamba1 scans, gated delta nets, RG-LRU
(RecurrentGemma) and RWKV blocks.

A hybrid model mixes tokens in two ways: attention (whose K/V state :mod:`ds_chunkflow.ops.state`
carries) and recurrent mixers whose state is constant in the sequence length: the last
``k`` inputs of a causal convolution, an SSM state ``[heads, head_dim, d_state]``, a
delta-net state ``[heads, d_k, d_v]``. For the duration of a chunked step,
:func:`use_chunkflow_mixers` replaces the forward of every mixer whose class is in
:data:`SUPPORTED` by an adapter that runs the module's own forward once per chunk::

    packed chunk   [a a a | b b | c]   -> conv / scan run per segment, each from a zero state
    dependent i    [x_i ...]           -> the mixer starts from the final state of chunk i-1

The module's own code does the work. transformers' mixers take their starting state from a
``cache`` (``get_conv_state`` / ``get_recurrent_state``) and hand back the final one
(``update_conv_state`` / ``update_recurrent_state``); :class:`_StateCache` is a ``Cache`` with that
part of the cache API (the methods per release: :mod:`ds_chunkflow.hf.transformers_adapter`). In a packed
chunk the model-module functions that mix tokens (:data:`_SEGMENTED_FUNCTIONS`: ``causal_conv1d_fn``,
``mamba2_chunk_scan``, ``torch_chunk_gated_delta_rule``, ``mamba_selective_scan``) are wrapped to run once per
segment; the module itself is called once, so under ZeRO-3 every rank gathers the same
parameters in the same order whatever its chunks pack. The CPU torch path is the tested one;
where causal-conv1d / mamba-ssm / flash-linear-attention are installed, the model's dispatch
to them (which take initial states) is used unchanged (untested here: no GPU). The Mamba1
scans (Jamba, Zamba, Mamba, FalconMamba) are the exception: neither transformers' multi-token
``mamba_selective_scan`` nor mamba-ssm's kernel takes a start state, so a dependent chunk with a carried
state runs transformers' torch recurrence from it (:func:`_selective_scan_from`; a token loop, also on GPU).

RecurrentGemma's recurrent block and RWKV's block keep their state outside transformers' cache (a module attribute,
the model's ``state`` list); their adapters run the block's own code from the carried state through a few
submodules swapped for the call (:func:`_call_recurrent_gemma_block`, :func:`_call_rwkv_block`).

A model without attention (Mamba, Mamba2, FalconMamba, RWKV) is a model whose only state is its mixers': each
adapter call counts as a layer that received the chunk layout (``ChunkContext.num_layer_calls``).
Zamba's shared attention blocks, one module per hybrid layer built with one ``layer_idx``, get their
layer's index for the step, so their K/V states stay apart (``transformers_adapter.SHARED_ATTENTION_LAYERS``).

A layer that calls its mixer without the layer's kwargs (Jamba, Mamba) gives the mixer its chunk only
through the model's forward; a transformers layer checkpoint recomputing it in the backward
runs under the chunk layout of its forward (:func:`_under_current_chunk`).

The state and its gradient, per dependent group and mixer (:class:`MixerStates`, on the
group's :class:`~ds_chunkflow.ops.state.GroupState`)::

    forward chunk i     start = values[p_i] as a leaf (requires_grad)  -> mixer -> final
                        values[p_{i+1}] = final (detached);  out = _Carry(out, final)
    backward chunk i    d(loss)/d(start_i) accumulates in the leaf's .grad
    backward chunk i-1  _Carry hands leaf_{p_i}.grad to final_{i-1}, so it flows into chunk i-1

Chunks run backward in descending order (:mod:`ds_chunkflow.plan.schedule`), so the leaf's
gradient is complete when chunk i-1's backward reads it. ``values[p_i]`` is kept until chunk
i-1's backward, because a recomputed chunk starts from it again; a StateForward (no grad)
only writes ``values``; a layer checkpoint recomputing the mixer inside chunk i's backward
reuses chunk i's leaf. Cost per sample: one state per mixer and chunk boundary
(:attr:`MixerStates.bytes_per_boundary`), independent of the chunk length.

A one-token dependent chunk (only ever a sequence's last) is run as two tokens, the second a
zero input whose output is dropped (the mixers are causal), so the mixers never take their
in-place single-token decode path, which the kernels do not differentiate.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ds_chunkflow.hf import transformers_adapter
from ds_chunkflow.ops.context import SegmentSpec

# class path -> what it is. Each entry is tested against the full-sequence reference (tests/ops/test_mixers.py).
SUPPORTED = {
    "transformers.models.lfm2.modeling_lfm2.Lfm2ShortConv": "short causal convolution (LFM2)",
    "transformers.models.qwen3_next.modeling_qwen3_next.Qwen3NextGatedDeltaNet": "gated delta net (Qwen3-Next)",
    "transformers.models.granitemoehybrid.modeling_granitemoehybrid.GraniteMoeHybridMambaLayer":
        "Mamba2 SSD (Granite-4 hybrid)",
    "transformers.models.bamba.modeling_bamba.BambaMixer": "Mamba2 SSD (Bamba)",
    "transformers.models.nemotron_h.modeling_nemotron_h.NemotronHMamba2Mixer": "Mamba2 SSD (NemotronH)",
    "transformers.models.jamba.modeling_jamba.JambaMambaMixer": "Mamba1 selective scan (Jamba)",
    "transformers.models.lfm2_moe.modeling_lfm2_moe.Lfm2MoeShortConv": "short causal convolution (LFM2-MoE)",
    "transformers.models.falcon_h1.modeling_falcon_h1.FalconH1Mixer": "Mamba2 SSD (Falcon-H1)",
    "transformers.models.zamba2.modeling_zamba2.Zamba2MambaMixer": "Mamba2 SSD (Zamba2)",
    "transformers.models.mamba2.modeling_mamba2.Mamba2Mixer": "Mamba2 SSD (pure Mamba2)",
    "transformers.models.zamba.modeling_zamba.ZambaMambaMixer": "Mamba1 selective scan, one per head (Zamba)",
    "transformers.models.mamba.modeling_mamba.MambaMixer": "Mamba1 selective scan (pure Mamba)",
    "transformers.models.falcon_mamba.modeling_falcon_mamba.FalconMambaMixer": "Mamba1 selective scan (FalconMamba)",
    "transformers.models.recurrent_gemma.modeling_recurrent_gemma.RecurrentGemmaRecurrentBlock":
        "RG-LRU + short convolution (RecurrentGemma)",
    "transformers.models.rwkv.modeling_rwkv.RwkvBlock": "WKV recurrence + token shifts (RWKV)",
}

_OUTSIDE, _PLAIN = "outside the model's forward", "a forward without the chunk layout"
_CURRENT: contextvars.ContextVar = contextvars.ContextVar("ds_chunkflow_chunk", default=_OUTSIDE)
_ACTIVE_ATTR = "_ds_chunkflow_mixers_active"
# the _StateCache of the mixer call under way: a scan function the model calls without its start state reads it here
_CALL: contextvars.ContextVar = contextvars.ContextVar("ds_chunkflow_mixer_call", default=None)


def class_path(module: torch.nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def is_supported(module: torch.nn.Module) -> bool:
    return class_path(module) in SUPPORTED


def supported_mixers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of the mixers in ``model`` that have an adapter."""
    return [(n, m) for n, m in model.named_modules() if is_supported(m)]


@dataclass
class MixerStates:
    """Per dependent group: each mixer's state at each chunk start, and the leaves that collect its gradient."""

    values: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    leaves: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    bytes_per_boundary: int = 0  # one sample's state at one chunk boundary, all mixers: constant in the length
    peak_bytes: int = 0  # most held at once: K=1 keeps every boundary until the recomputes reach it
    _saved_at: dict[int, int] = field(default_factory=dict)

    def start(self, name: str, position: int) -> dict[str, torch.Tensor]:
        """The state chunk ``[position, ...)`` starts from, as fresh leaves ({} at position 0)."""
        if position == 0:
            return {}
        saved = self.values.get((name, position))
        if saved is None:
            raise RuntimeError(f"mixer {name}: no state at token {position}; the chunk before it has not run")
        if not torch.is_grad_enabled():  # a StateForward: no gradient to collect
            return {k: v.clone() for k, v in saved.items()}
        # One graph-building forward per chunk (Forward or Recompute); a second call is a layer
        # checkpoint recomputing inside that chunk's backward, whose gradient reaches the first leaf.
        leaves = self.leaves.setdefault((name, position),
                                        {k: v.clone().requires_grad_(True) for k, v in saved.items()})
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        return leaves

    def save(self, name: str, position: int, final: dict[str, torch.Tensor]) -> None:
        if (name, position) in self.values:  # a recompute writes the same state again
            return
        self.values[(name, position)] = {k: v.detach() for k, v in final.items()}
        self._saved_at[position] = self._saved_at.get(position, 0) + sum(t.numel() * t.element_size()
                                                                         for t in final.values())
        self.bytes_per_boundary = max(self.bytes_per_boundary, self._saved_at[position])
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def pending_grads(self, name: str, position: int, keys: list[str]) -> list[torch.Tensor | None]:
        """What the chunk starting at ``position`` sent back to its start state; frees that chunk's state."""
        self.values.pop((name, position), None)  # that chunk has had its backward: it never runs again
        leaves = self.leaves.pop((name, position), {})
        return [leaves[k].grad if k in leaves else None for k in keys]

    @property
    def nbytes(self) -> int:
        tensors = [t for d in self.values.values() for t in d.values()]
        tensors += [g for d in self.leaves.values() for t in d.values() for g in (t, t.grad) if g is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


class _StateCache(transformers_adapter.cache_base()):
    """The part of transformers' ``Cache`` a mixer uses, for one call: a dependent piece (its start state) or a
    packed chunk (empty: no start state, and the mixer stays off its fused no-cache training path).

    A real ``Cache`` (no layers) overriding every method a mixer calls (``transformers_adapter.MIXER_CACHE_METHODS``,
    5.24 and 5.25); ``tests/hf/test_transformers_adapter.py`` checks the installed mixers call no other."""

    def __init__(self, initial: dict[str, torch.Tensor]):
        super().__init__(layers=[])
        self.initial = initial
        self.final: dict[str, torch.Tensor] = {}
        self._scans = 0

    def next_scan(self) -> int:
        """How many scans this mixer call ran before this one (Zamba: the head the scan is for)."""
        self._scans += 1
        return self._scans - 1

    def is_recording_past(self, layer_idx: int) -> bool:
        return True  # never the in-place single-token decode path

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return 0  # 5.25: per-token states for speculative decoding; training keeps only the final one

    def increase_count(self, layer_idx: int, state_idx: int = 0):
        raise RuntimeError("ds_chunkflow: a mixer took the single-token decode path")  # 5.25, decode only

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        return self.initial.get(f"conv{state_idx}")

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        return self.initial.get(f"recurrent{state_idx}")

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs) -> torch.Tensor:
        """``[B, C, T]`` inputs -> the inputs with the carried window in front; keeps the last ``k`` as final."""
        if conv_kernel_size is None:
            raise RuntimeError("ds_chunkflow: the mixer did not pass conv_kernel_size to update_conv_state")
        init = self.initial.get(f"conv{state_idx}")
        full = conv_states if init is None else torch.cat([init.to(conv_states.dtype), conv_states], dim=-1)
        short = conv_kernel_size - full.shape[-1]
        self.final[f"conv{state_idx}"] = F.pad(full, (short, 0)) if short > 0 else full[..., -conv_kernel_size:]
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                               **kwargs) -> torch.Tensor:
        self.final[f"recurrent{state_idx}"] = recurrent_states
        return recurrent_states


class _Carry(torch.autograd.Function):
    """Identity on the mixer output whose backward also sends the next chunk's start-state gradient to ``finals``."""

    @staticmethod
    def forward(ctx, states: MixerStates, name: str, end: int, keys: list[str], out, *finals):
        ctx.args = (states, name, end, keys)
        return out.clone()

    @staticmethod
    def backward(ctx, dout):
        states, name, end, keys = ctx.args
        return (None, None, None, None, dout, *states.pending_grads(name, end, keys))


def _run_dependent(name: str, call, x: torch.Tensor, seg: SegmentSpec) -> torch.Tensor:
    """One piece of a long sequence: the mixer starts from the state the chunk before left, hands on its own."""
    if seg.state.mixers is None:
        seg.state.mixers = MixerStates()
    states: MixerStates = seg.state.mixers
    end = seg.position + seg.length
    last = end >= seg.state.seq_len
    cache = _StateCache(states.start(name, seg.position))
    if seg.length == 1 and not last:
        raise NotImplementedError(f"mixer {name}: a one-token dependent chunk inside a sequence (chunk_size 1)")
    token = _CALL.set(cache)
    try:
        out = call(F.pad(x, (0, 0, 0, 1)), cache)[:, :1] if seg.length == 1 else call(x, cache)
    finally:
        _CALL.reset(token)
    if last:
        return out
    missing = set(cache.initial) - set(cache.final)
    if missing or not cache.final:
        raise RuntimeError(f"mixer {name} ({seg.state.seq_len} tokens) did not hand back its final state "
                           f"{sorted(missing) or '(none)'}; ChunkFlow cannot carry it to the next chunk")
    states.save(name, end, cache.final)
    if not torch.is_grad_enabled():
        return out
    keys = sorted(cache.final)
    return _Carry.apply(states, name, end, keys, out, *[cache.final[k] for k in keys])


# ---------------------------------------------------------------------------- packed chunks
# The module runs once per chunk (ZeRO-3 gathers parameters per submodule call, so the calls
# must not depend on how many sequences a rank's chunk packs); the functions that mix tokens,
# the causal conv and the scans, run once per segment, each from a zero state:
#
#     mixer([a a a b b c]) -> in_proj -> conv(a) conv(b) conv(c) -> scan(a) scan(b) scan(c) -> out_proj
#
# name -> {argument: time dim} of the model-module functions that mix tokens (all take one batch row); the
# output's time dim is the first argument's.
_SEGMENTED_FUNCTIONS = {
    "causal_conv1d_fn": {"hidden_states": -1},
    "mamba2_chunk_scan": {"hidden_states": 1, "dt": 1, "B": 1, "C": 1},
    "torch_chunk_gated_delta_rule": {"query": 1, "key": 1, "value": 1, "g": 1, "beta": 1},
    "mamba_selective_scan": {"hidden_states": -1, "dt": -1, "B": -1, "C": -1, "z": -1},  # Jamba: [B, C, T]
    "rwkv_linear_attention": {"key": 1, "value": 1},
}
_SEGMENTS: contextvars.ContextVar[list[tuple[int, int]] | None] = contextvars.ContextVar("ds_chunkflow_segments",
                                                                                          default=None)


def _segmented(fn, time_dims: dict[str, int]):
    signature = transformers_adapter.signature(fn)  # a kernels Func module's own is (*args, **kwargs)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def run(*args, **kwargs):
        bounds = _SEGMENTS.get()
        if bounds is None:
            return fn(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        if bound.arguments.get("initial_state") is not None or bound.arguments.get("initial_states") is not None:
            raise RuntimeError(f"{fn.__name__}: a packed chunk starts every sequence from zero, got an initial state")
        outs, rest = [], None
        for lo, hi in bounds:
            part = dict(bound.arguments)
            for arg, dim in time_dims.items():
                t = part.get(arg)
                if t is not None:
                    part[arg] = t.narrow(dim, lo, hi - lo) if dim >= 0 else t[..., lo:hi]
            extra = part.pop(var_keyword, {}) if var_keyword else {}
            result = fn(**part, **extra)
            out, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, None)
            outs.append(out)
        out = torch.cat(outs, dim=next(iter(time_dims.values())))
        return out if rest is None else (out, *rest)  # the final state is the last sequence's (unused)

    run.__wrapped__ = fn
    return run


# ---------------------------------------------------------------------------- scans that take no start state
# Jamba's (Mamba1) multi-token scan ``mamba_selective_scan`` always starts from zero (transformers uses the cached
# SSM state only in one-token decode, and mamba-ssm's ``selective_scan_fn`` takes no initial state). In a dependent
# chunk with a carried state the call runs :func:`_selective_scan_from` instead: transformers' torch recurrence
# (``mamba_selective_scan``'s sequential branch) line for line, the state starting from the carried one.
def _selective_scan_from(ssm_state, hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, return_last_state=False, **kwargs):
    """``hidden_states, dt, z`` ``[b, d, T]``, ``B, C`` ``[b, n, T]``, ``A`` ``[d, n]``, ``ssm_state`` ``[b, d, n]``."""
    input_dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    B = B.transpose(1, 2)
    C = C.transpose(1, 2)
    discrete_A = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    discrete_B = dt[:, :, :, None] * B[:, None, :, :].float()
    deltaB_u = discrete_B * hidden_states[:, :, :, None].float()
    scan_outputs = []
    for index in range(hidden_states.shape[-1]):
        ssm_state = discrete_A[:, :, index] * ssm_state + deltaB_u[:, :, index]
        scan_output = torch.matmul(ssm_state.to(input_dtype), C[:, index, :].unsqueeze(-1))
        scan_outputs.append(scan_output[:, :, 0])
    scan_output = torch.stack(scan_outputs, dim=-1)
    if D is not None:
        scan_output = scan_output + hidden_states * D[None, :, None]
    if z is not None:
        scan_output = scan_output * F.silu(z)
    return (scan_output, ssm_state) if return_last_state else scan_output


def _started(fn, module=None):
    """The model's scan ``fn``, or where the call under way has a carried SSM state, the same scan from it.

    Zamba's mixer scans its heads one call each, in head order, and caches their final states stacked
    (``[b, heads, d, n]``): the ``i``-th scan of a mixer call starts from head ``i``'s state."""
    def run(*args, **kwargs):
        cache = _CALL.get()
        start = cache.initial.get("recurrent0") if cache is not None else None
        if start is None:
            return fn(*args, **kwargs)
        if start.dim() == 4:
            start = start[:, cache.next_scan()]
        return _selective_scan_from(start, *args, **kwargs)

    run.__wrapped__ = fn
    return run


# name -> the wrapper that gives that model-module function the carried start state
_STARTED_FUNCTIONS = {"mamba_selective_scan": _started,
                      "rwkv_linear_attention": lambda fn, module: _state_copies(fn, module)}
# (RWKV: the state copies and the torch path, :func:`_state_copies`)


@contextlib.contextmanager
def _patched_functions(mixers: list[tuple[str, torch.nn.Module]]):
    modules = {sys.modules[type(m).__module__] for _, m in mixers}
    saved = []
    for mod in modules:
        for fname, dims in _SEGMENTED_FUNCTIONS.items():
            if hasattr(mod, fname):
                saved.append((mod, fname, getattr(mod, fname)))
                fn = getattr(mod, fname)
                if fname in _STARTED_FUNCTIONS:
                    fn = _STARTED_FUNCTIONS[fname](fn, mod)
                setattr(mod, fname, _segmented(fn, dims))
    try:
        yield
    finally:
        for mod, fname, fn in saved:
            setattr(mod, fname, fn)


def _run_packed(call, x: torch.Tensor, segments: list[SegmentSpec]) -> torch.Tensor:
    # an empty cache keeps the mixer on its unfused path, whose token mixing goes through the functions above
    cache = _StateCache({})
    token, call_token = _SEGMENTS.set([(s.start, s.start + s.length) for s in segments]), _CALL.set(cache)
    try:
        return call(x, cache)
    finally:
        _CALL.reset(call_token)
        _SEGMENTS.reset(token)


# ---------------------------------------------------------------------------- RecurrentGemma's recurrent block
# Its state lives outside transformers' cache: the RG-LRU reads its start state from the module attribute
# ``rg_lru.recurrent_states`` (which the block clears on every forward without a cache) and the block's causal
# convolution is a plain ``nn.Conv1d`` over the call (padding ``width - 1``, no start window). For one call the two
# submodules run from the call's state instead; the block's own code does the rest. The RG-LRU restarts by itself
# where ``position_ids`` is 0, so a packed chunk only needs its convolution run per segment.
def _call_recurrent_gemma_block(block, original, kwargs, x, cache) -> torch.Tensor:
    positions = kwargs["position_ids"]
    if positions.shape[1] < x.shape[1]:  # a one-token piece run as two (_run_dependent): the padding token's position
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    conv, lru = block.conv_1d, block.rg_lru
    conv_forward, lru_forward = conv.forward, lru.forward
    window = conv.kernel_size[0] - 1

    def conv_from_window(x_branch):  # [b, C, T] -> the causal conv's [b, C, T]
        bounds = _SEGMENTS.get()
        if bounds is not None:  # packed: each sequence from zero
            return torch.cat([conv_forward(x_branch[..., lo:hi])[..., :hi - lo] for lo, hi in bounds], dim=-1)
        full = cache.update_conv_state(x_branch, 0, conv_kernel_size=window)  # window + inputs
        skip = full.shape[-1] - x_branch.shape[-1]
        return conv_forward(full)[..., skip:skip + x_branch.shape[-1]]

    def lru_from_state(activations, position_ids):
        lru.recurrent_states = cache.initial.get("recurrent0")
        try:
            out = lru_forward(activations, position_ids)
            cache.update_recurrent_state(lru.recurrent_states, 0)
        finally:
            lru.recurrent_states = None  # no tensor of this step's graph left on the module
        return out

    conv.forward, lru.forward = conv_from_window, lru_from_state
    try:
        out, _ = original(x, position_ids=positions, attention_mask=None, use_cache=False)
    finally:
        del conv.forward, lru.forward
    return out


# ---------------------------------------------------------------------------- RWKV's blocks
# An RWKV block carries five states per layer in the model's ``state`` list (``[b, hidden, layers]`` each): the
# channel-mix and time-mix token shifts (the previous token's input) and the WKV numerator, denominator and running
# max. For one dependent piece its time mix and channel mix each run on a fresh five-tensor list holding only the
# carried state (in the block's own layer column) and hand back that column; ``rwkv_linear_attention`` gets its state
# as copies (:func:`_state_copies`), since the module writes the final state into the same list in place. A packed
# chunk runs the block without a state: the WKV per segment (:data:`_SEGMENTED_FUNCTIONS`), each token shift per
# segment. The block is itself transformers' checkpointing layer, so its checkpoint is taken here, around all of
# this: a recompute in the backward runs with the same state and segments.
def _call_rwkv_block(block, original, kwargs, x, cache) -> torch.Tensor:
    raw = functools.partial(type(block).forward.__wrapped__, block)  # inside transformers' checkpoint wrapper
    bounds, layer = _SEGMENTS.get(), block.layer_id
    attention, feed_forward = block.attention, block.feed_forward
    att_forward, ff_forward = attention.forward, feed_forward.forward

    def fresh_state(like):
        wkv_dtype = torch.promote_types(like.dtype, torch.float32)  # the WKV accumulates in float32 at least
        width = attention.attention_hidden_size
        state = [like.new_zeros(like.shape[0], like.shape[-1], layer + 1) for _ in range(2)]
        state += [like.new_zeros(like.shape[0], width, layer + 1, dtype=wkv_dtype) for _ in range(3)]
        state[4] -= 1e38  # the max over no token (rwkv_linear_attention_cpu's start without a state)
        for i in range(5):
            if f"recurrent{i}" in cache.initial:
                state[i][:, :, layer] = cache.initial[f"recurrent{i}"]
        return state

    def time_mix(hidden, state=None, use_cache=False):
        out, state = att_forward(hidden, state=fresh_state(hidden), use_cache=True)
        for i in (1, 2, 3, 4):
            cache.update_recurrent_state(state[i][:, :, layer], 0, state_idx=i)
        return out, None

    def channel_mix(hidden, state=None):
        out, state = ff_forward(hidden, state=fresh_state(hidden))
        cache.update_recurrent_state(state[0][:, :, layer], 0, state_idx=0)
        return out, None

    def run(x):
        patched = [attention.time_shift, feed_forward.time_shift] if bounds is not None else [attention, feed_forward]
        if bounds is not None:
            for shift in patched:
                shift.forward = functools.partial(_segment_shift, type(shift).forward.__get__(shift))
        else:
            attention.forward, feed_forward.forward = time_mix, channel_mix
        token = _SEGMENTS.set(bounds)
        try:
            return raw(x, state=None, use_cache=False)[0]
        finally:
            _SEGMENTS.reset(token)
            for module in patched:
                del module.forward

    if block.gradient_checkpointing and block.training and torch.is_grad_enabled():
        return block._gradient_checkpointing_func(run, x)
    return run(x)


def _segment_shift(shift, hidden):
    """``nn.ZeroPad2d((0, 0, 1, -1))`` (each token sees the one before) with a zero at every segment start."""
    return torch.cat([shift(hidden[:, lo:hi]) for lo, hi in _SEGMENTS.get()], dim=1)


def _state_copies(fn, module):
    """``rwkv_linear_attention`` on copies of its state (the block overwrites the state it passed, in place). With a
    state, transformers' torch recurrence (``rwkv_linear_attention_cpu``, also on GPU): the CUDA kernel's backward
    returns no gradient for the start state, which a carried state needs."""
    torch_path = module.rwkv_linear_attention_cpu  # transformers_adapter.CALLED_FUNCTIONS

    def run(time_decay, time_first, key, value, state=None, return_state=False):
        if state is None:
            return fn(time_decay, time_first, key, value, state=None, return_state=return_state)
        return torch_path(time_decay, time_first, key, value, state=[s.clone() for s in state],
                          return_state=return_state)

    run.__wrapped__ = fn
    return run


def _call_mixer(module, original, kwargs, x, cache) -> torch.Tensor:
    return original(x, cache=cache, attention_mask=None)


# class path -> how its adapter calls it for one piece with a state cache, and whether the module returns (out, None)
_CALLS = {"transformers.models.recurrent_gemma.modeling_recurrent_gemma.RecurrentGemmaRecurrentBlock":
          (_call_recurrent_gemma_block, lambda out, kwargs: (out, None)),
          "transformers.models.rwkv.modeling_rwkv.RwkvBlock":  # (hidden, the model's state list, attentions)
          (_call_rwkv_block, lambda out, kwargs: (out, kwargs.get("state"), None))}


def _adapter(name: str, original, module):
    run, returns = _CALLS.get(class_path(module), (_call_mixer, None))

    def forward(hidden_states, *args, **kwargs):
        call = functools.partial(run, module, original, kwargs)
        out = chunked(hidden_states, *args, call=call, **kwargs)
        return out if returns is None or isinstance(out, tuple) else returns(out, kwargs)

    def chunked(hidden_states, *args, call, **kwargs):
        ctx = kwargs.get("chunkflow") or _CURRENT.get()
        if ctx is _PLAIN:  # the model called without a chunk layout: its own forward
            return original(hidden_states, *args, **kwargs)
        if ctx is _OUTSIDE:
            raise RuntimeError(f"mixer {name} ran outside the model's forward without the chunk layout (a layer "
                               "recompute whose layer does not pass its kwargs on?); its state cannot be carried")
        if args or kwargs.get("cache") is not None:
            raise ValueError(f"mixer {name}: ChunkFlow trains without a generation cache (use_cache=False)")
        if hidden_states.shape[0] != 1:
            raise ValueError(f"ChunkFlow runs one chunk per call (batch 1), got batch {hidden_states.shape[0]}")
        ctx.num_layer_calls += 1  # a layer that got the chunk layout (a model without attention has only these)
        segs = ctx.segments
        if segs[0].state is not None:
            if len(segs) != 1:
                raise AssertionError("a dependent chunk holds one piece of one sequence")
            return _run_dependent(name, call, hidden_states, segs[0])
        return _run_packed(call, hidden_states, segs)

    return forward


@contextlib.contextmanager
def chunk_scope(ctx):
    """The chunk the mixers see inside the block: set by the chunk runtime around every chunk forward, so
    layers called directly (a pipeline stage's) get it without going through the model's forward."""
    token = _CURRENT.set(ctx)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def use_chunkflow_mixers(model: torch.nn.Module, from_forward_kwargs: bool = True):
    """Routes every supported mixer of ``model`` through its ChunkFlow adapter for the block (re-entrant).

    ``from_forward_kwargs``: each call of ``model`` sets the chunk from its ``chunkflow`` kwarg (a call
    without one is the model's own plain forward). False for a module called without kwargs (a pipeline
    stage): the mixers see the chunk of the enclosing :func:`chunk_scope`."""
    mixers = supported_mixers(model)
    if not mixers or getattr(model, _ACTIVE_ATTR, False):
        yield
        return
    tokens: list[contextvars.Token] = []

    def enter(module, args, kwargs):
        tokens.append(_CURRENT.set(kwargs.get("chunkflow") or _PLAIN))

    def leave(module, args, kwargs, output):
        _CURRENT.reset(tokens.pop())

    handles = [] if not from_forward_kwargs else [
        model.register_forward_pre_hook(enter, with_kwargs=True),
        model.register_forward_hook(leave, with_kwargs=True, always_call=True)]
    previous = [(m, vars(m).get("forward")) for _, m in mixers]  # an instance-level forward, if any
    # transformers' layer checkpointing recomputes a layer's forward inside the backward, outside the model's
    # forward; a layer that does not pass its kwargs to its mixer (Jamba) would leave the mixer without its chunk:
    # the recompute runs under the chunk layout the forward had.
    mixer_ids = {id(m) for _, m in mixers}
    holders = [h for h in model.modules() if "_gradient_checkpointing_func" in vars(h)
               and any(id(m) in mixer_ids for m in h.modules())]
    checkpointing = [(h, vars(h)["_gradient_checkpointing_func"]) for h in holders]
    for h, ckpt in checkpointing:
        h._gradient_checkpointing_func = _under_current_chunk(ckpt)
    for name, m in mixers:
        m.forward = _adapter(name, m.forward, m)
    # Zamba's shared attention blocks share one layer_idx; the K/V state is keyed by it (transformers_adapter, 8.)
    shared = [(attn, attn.layer_idx, index) for attn, index in transformers_adapter.shared_attention_indices(model)]
    if len({id(attn) for attn, _, _ in shared}) != len(shared):
        raise NotImplementedError("one attention module serves several hybrid layers; ChunkFlow keys its K/V state by "
                                  "module and cannot tell the layers apart")
    for attn, _, index in shared:
        attn.layer_idx = index
    object.__setattr__(model, _ACTIVE_ATTR, True)
    try:
        with _patched_functions(mixers):
            yield
    finally:
        object.__setattr__(model, _ACTIVE_ATTR, False)
        for h in handles:
            h.remove()
        for m, forward in previous:
            if forward is None:
                del m.forward
            else:
                m.forward = forward
        for h, ckpt in checkpointing:
            h._gradient_checkpointing_func = ckpt
        for attn, built_with, _ in shared:
            attn.layer_idx = built_with


def _under_current_chunk(checkpoint):
    def run(function, *args, **kwargs):
        chunk = _CURRENT.get()

        def under_chunk(*a, **k):
            token = _CURRENT.set(chunk)
            try:
                return function(*a, **k)
            finally:
                _CURRENT.reset(token)

        return checkpoint(under_chunk, *args, **kwargs)

    run.__wrapped__ = checkpoint
    return run
