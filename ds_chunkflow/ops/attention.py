"""ChunkFlow attention, plugged into unmodified transformers models.

Registered as ``"chunkflow"`` with ``transformers.AttentionInterface``; selected for the
duration of one chunked step by :func:`use_chunkflow_attention` (the model's own
setting is restored afterwards). The model passes ``chunkflow=ChunkContext(...)``
through its forward kwargs; transformers threads it to every attention layer, and
builds no mask for this implementation name, so the context alone defines visibility:

    packed chunk   [a a a | b b | c]   -> block-diagonal causal, one block per segment
    dependent i    [x_i ...]           -> causal on its own tokens + all of x_0..x_{i-1}
                                          (read from the group's K/V state, no copy)

Per segment, the query rows are computed against up to two key blocks (the state
prefix and the segment itself) and softmax-merged through their log-sum-exp, see
:mod:`ds_chunkflow.ops.kernels` (which kernel each block gets). A packed chunk without any
state prefix on CUDA with flash-attn installed is one varlen call instead
(:mod:`ds_chunkflow.ops.varlen`). Gemma 2's attention logit softcap is a score function applied
per block (math kernel); GPT-OSS's attention sinks (one learned logit per head in the
softmax denominator, value 0) are folded in once per query row after the merge, so a row
split over a prefix and its own keys still counts its sink once. The custom autograd
function routes the gradient of the prefix into the group state and adds the gradient that
later chunks left for this chunk's own K/V, so ``loss.backward()`` of chunk i is all a
caller does.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from ds_chunkflow.ops import kernels, varlen
from ds_chunkflow.ops.context import ChunkContext, SegmentSpec

ATTN_NAME = "chunkflow"


class MissingChunkContext(RuntimeError):
    """The attention was called without the chunk layout: a layer did not pass the model's kwargs through."""


def _expand(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    # transformers' repeat_kv: query head h uses kv head h // n_rep
    return t if n_rep == 1 else t.repeat_interleave(n_rep, dim=1)


def _reduce(dt: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return dt
    b, h, t, d = dt.shape
    return dt.view(b, h // n_rep, n_rep, t, d).sum(2)


def _stack(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[1, H, T, ...]`` -> ``[1, Hkv, n_rep * T, ...]``: the query heads sharing a KV head, as rows."""
    return x.reshape(x.shape[0], x.shape[1] // n_rep, n_rep * x.shape[2], *x.shape[3:])


def _unstack(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1] * n_rep, x.shape[2] // n_rep, *x.shape[3:])


def _rows(b: kernels.Block, n_rep: int) -> kernels.Block:
    """A fully visible block with the ``n_rep`` query heads sharing a KV head stacked as rows. The stacked rows'
    "positions" run past the real ones, so the window (which cuts nothing here) is dropped; the softcap stays."""
    return dataclasses.replace(b, tq=n_rep * b.tq, window=None)


def _stackable(b: kernels.Block, n_rep: int, dropout: float) -> bool:
    # With no mask, query rows are independent, so GQA heads can share one K/V block as
    # extra rows instead of repeating K/V (the prefix would be copied n_rep times).
    return n_rep > 1 and b.fully_visible and dropout == 0


def _gqa_forward(q, k, v, b: kernels.Block, n_rep: int, scale, dropout, seed):
    if n_rep > 1 and kernels.takes_gqa(q, v, b, dropout):  # the kernel maps query heads to k/v heads itself
        return kernels.block_forward(q, k, v, b, scale)
    if _stackable(b, n_rep, dropout):
        rows = _rows(b, n_rep)
        out, lse = kernels.block_forward(_stack(q, n_rep), k, v, rows, scale)
        return _unstack(out, n_rep), _unstack(lse, n_rep)
    return kernels.block_forward(q, _expand(k, n_rep), _expand(v, n_rep), b, scale, dropout, seed)


def _gqa_backward(do, q, k, v, out, lse, b: kernels.Block, n_rep: int, scale, dropout, seed):
    """Gradients for q ``[1, H, ...]`` and k, v ``[1, Hkv, ...]``."""
    if n_rep > 1 and kernels.takes_gqa(q, v, b, dropout):
        return kernels.block_backward(do, q, k, v, out, lse, b, scale)
    if _stackable(b, n_rep, dropout):
        rows = _rows(b, n_rep)
        dq, dk, dv = kernels.block_backward(_stack(do, n_rep), _stack(q, n_rep), k, v, _stack(out, n_rep),
                                            _stack(lse, n_rep), rows, scale)
        return _unstack(dq, n_rep), dk, dv
    dq, dk, dv = kernels.block_backward(do, q, _expand(k, n_rep), _expand(v, n_rep), out, lse, b, scale, dropout,
                                        seed)
    return dq, _reduce(dk, n_rep), _reduce(dv, n_rep)


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _blocks(seg: SegmentSpec, layer: int, window: int | None, softcap: float | None, device):
    """(key, value, Block, first key) of the state prefix a segment attends to, if any."""
    lo = 0 if window is None else max(0, seg.position - window + 1)
    if seg.state is not None and seg.position > lo:
        k, v = seg.state.prefix(layer, lo, seg.position, device)
        yield k, v, kernels.Block(seg.position, lo, seg.length, seg.position - lo, window, softcap), lo


def _own(seg: SegmentSpec, window: int | None, softcap: float | None) -> kernels.Block:
    """The block of a segment's queries against its own keys (causal)."""
    return kernels.Block(seg.position, seg.position, seg.length, seg.length, window, softcap)


class _ChunkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, chunk: ChunkContext, layer, scale, window, softcap, dropout, seed):
        n_rep = q.shape[1] // k.shape[1]
        outs, lses = [], []
        for seg in chunk.segments:
            rows = slice(seg.start, seg.start + seg.length)
            qs = q[:, :, rows]
            parts = [_gqa_forward(qs, kp, vp, b, n_rep, scale, dropout, seed)
                     for kp, vp, b, _ in _blocks(seg, layer, window, softcap, q.device)]
            own = _own(seg, window, softcap)
            parts.append(_gqa_forward(qs, k[:, :, rows], v[:, :, rows], own, n_rep, scale, dropout, seed))
            seg_out, seg_lse = kernels.merge([p[0] for p in parts], [p[1] for p in parts])
            outs.append(seg_out)
            lses.append(seg_lse)
        out, lse = _cat_rows(outs), _cat_rows(lses)
        if sinks is not None:  # once per query row, after all its blocks are merged
            out, lse = kernels.fold_sink(out, lse, sinks)
        # the sinks' values, not the parameter: under ZeRO-3 its data may be released before the backward
        ctx.save_for_backward(q, k, v, None if sinks is None else sinks.detach().clone(), out, lse)
        ctx.args = (chunk, layer, scale, window, softcap, dropout, seed)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sinks, out, lse = ctx.saved_tensors
        chunk, layer, scale, window, softcap, dropout, seed = ctx.args
        n_rep = q.shape[1] // k.shape[1]
        dqs, dks, dvs = [], [], []  # per segment, in row order (segments tile the chunk)
        for seg in chunk.segments:
            rows = slice(seg.start, seg.start + seg.length)
            qs, dos, os_, ls = q[:, :, rows], dout[:, :, rows], out[:, :, rows], lse[:, :, rows]
            own = _own(seg, window, softcap)
            gq, gk, gv = _gqa_backward(dos, qs, k[:, :, rows], v[:, :, rows], os_, ls, own, n_rep, scale, dropout,
                                       seed)
            for kp, vp, b, lo in _blocks(seg, layer, window, softcap, q.device):
                pq, pk, pv = _gqa_backward(dos, qs, kp, vp, os_, ls, b, n_rep, scale, dropout, seed)
                gq = gq + pq
                seg.state.add_grad(layer, lo, seg.position, pk, pv)
            if seg.state is not None:  # what later chunks' queries sent to these keys
                sk, sv = seg.state.pending_grad(layer, seg.position, seg.length, k)
                gk, gv = gk + sk, gv + sv
            dqs.append(gq)
            dks.append(gk)
            dvs.append(gv)
        dsinks = None if sinks is None else kernels.sink_grad(dout, out, lse, sinks)
        return _cat_rows(dqs), _cat_rows(dks), _cat_rows(dvs), dsinks, None, None, None, None, None, None, None


def chunkflow_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        sliding_window=None, softcap=None, s_aux=None, chunkflow: ChunkContext | None = None,
                        **kwargs):
    """transformers attention-interface function: ``[B,H,T,d]`` in, ``([B,T,H,d], None)`` out.

    ``softcap`` (Gemma 2): scores -> ``tanh(scores / softcap) * softcap`` before the mask, per block (math kernel).
    ``s_aux`` (GPT-OSS attention sinks, ``[H]``): one extra logit per head in every query's softmax
    denominator, folded into the merged result once per row (:func:`ds_chunkflow.ops.kernels.fold_sink`)."""
    if chunkflow is None:
        raise MissingChunkContext(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) was called "
                                  "without the chunk layout: its decoder layer does not pass attention kwargs through")
    if attention_mask is not None:
        raise ValueError("attention 'chunkflow' defines visibility from the chunk layout; got an attention_mask")
    if not getattr(module, "is_causal", True):
        raise NotImplementedError(f"{type(module).__name__} is not causal; ChunkFlow trains causal LMs")
    if query.shape[0] != 1:
        raise ValueError(f"ChunkFlow runs one chunk per call (batch 1), got batch {query.shape[0]}")
    layer = module.layer_idx
    chunkflow.num_layer_calls += 1
    sp = chunkflow.sp
    if sp is not None:  # my rows, all heads -> all rows, my heads (sequence_parallel.py)
        query, key, value = sp.gather_heads_many(query, key, value)  # one all-to-all for the three
        s_aux = None if s_aux is None else sp.my_heads(s_aux)
    for seg in chunkflow.segments:
        if seg.state is not None:
            rows = slice(seg.start, seg.start + seg.length)
            seg.state.write(layer, seg.position, key[:, :, rows], value[:, :, rows])
    scale = scaling if scaling is not None else kernels.default_scale(query.shape[-1])
    fn = None
    if s_aux is None and all(seg.state is None for seg in chunkflow.segments):  # flash-attn has no sinks
        fn = varlen.varlen_fn_for(query, float(dropout), head_dim=max(query.shape[-1], value.shape[-1]))
    if fn is not None:  # a packed chunk without a state prefix: one flash-attn varlen call, its own autograd
        lengths = varlen.segment_lengths([(s.start, s.length) for s in chunkflow.segments], query.shape[2])
        out = varlen.attention(fn, query, key, value, lengths, scale, sliding_window, softcap).transpose(1, 2)
    else:
        seed = 0
        if dropout > 0:
            # drawn from the global RNG, which the executor replays for a recomputed chunk
            seed = int(torch.randint(0, 2**62, (1,)).item())
        out = _ChunkAttention.apply(query, key, value, s_aux, chunkflow, layer, scale, sliding_window, softcap,
                                    float(dropout), seed)
    if sp is not None:  # both paths: all rows, my heads -> my rows, all heads
        out = sp.scatter_heads(out)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from ds_chunkflow.hf.transformers_adapter import register_attention

    register_attention(ATTN_NAME, chunkflow_attention)


@contextlib.contextmanager
def use_chunkflow_attention(config):
    """Selects the chunkflow attention in a model ``config`` for the block, restores it afterwards."""
    _register()
    previous = config._attn_implementation
    config._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
