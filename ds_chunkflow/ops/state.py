"""The K/V state of one dependent group (one long sequence split into chunks).

Per layer, one preallocated buffer holds the keys and values of the whole sequence,
``[num_kv_heads, seq_len, head_dim]`` (K and V head dims may differ, as in MLA), before
GQA repetition. Chunk i writes its K/V
at ``[offset_i, offset_i + T_i)`` during its forward and reads the prefix
``[0, offset_i)`` as a view: no per-chunk concatenation.

A second buffer per layer accumulates the gradient with respect to the state::

    backward of chunk i  adds d(loss)/dK[0:offset_i]           (its prefix)
                         reads d(loss)/dK[offset_i:offset_i+T]  (what later chunks sent)

Chunks run backward in descending order, so by the time chunk i runs backward every
later chunk has already added its share of chunk i's K/V gradient. Gradients are
accumulated in float32 (float64 for a float64 model).

With ``offload=True`` the buffers live on the CPU and the prefix is copied to the
compute device per use (counted in ``bytes_moved``). From CUDA the K/V buffers are pinned,
chunk writes run on a side stream overlapped with compute, and a prefix read waits on the
compute stream for the last write's event (:mod:`ds_chunkflow.ops.cuda_streams`); the gradient
buffers stay ordinary CPU tensors updated with synchronous copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ds_chunkflow.ops.cuda_streams import CopyStream, copy_stream


@dataclass
class _LayerBuffers:
    k: torch.Tensor
    v: torch.Tensor
    dk: torch.Tensor | None = None
    dv: torch.Tensor | None = None
    stream: CopyStream | None = None  # offloaded from CUDA: pinned k/v, writes on the side stream
    event: object | None = None  # the last write's copy event (reads wait for it)


@dataclass
class GroupState:
    """K/V state and its gradient for one dependent group, created empty, filled lazily."""

    seq_len: int
    offload: bool = False
    layers: dict[int, _LayerBuffers] = field(default_factory=dict)
    bytes_moved: int = 0
    mixers: object | None = None  # ds_chunkflow.ops.mixers.MixerStates of a hybrid model (constant in seq_len)

    @classmethod
    def for_sequence(cls, seq_len: int, offload_min_tokens: int | None) -> "GroupState":
        """State of a sequence of ``seq_len`` tokens, on the CPU if it is at least ``offload_min_tokens`` long."""
        return cls(seq_len, offload=offload_min_tokens is not None and seq_len >= offload_min_tokens)

    @property
    def storage_device(self) -> torch.device | None:
        return torch.device("cpu") if self.offload else None

    def write(self, layer: int, offset: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores chunk K/V ``[1, Hkv, T, d]`` at ``offset`` (data only, no autograd)."""
        buf = self.layers.get(layer)
        if buf is None:
            # K and V head dims may differ (MLA: 192 vs 128)
            k_shape, v_shape = (k.shape[1], self.seq_len, k.shape[3]), (v.shape[1], self.seq_len, v.shape[3])
            stream = copy_stream(k.device) if self.offload else None
            if stream is not None:  # CUDA -> pinned host buffers, written on the side stream
                buf = _LayerBuffers(stream.pinned_empty(k_shape, k.dtype), stream.pinned_empty(v_shape, v.dtype),
                                    stream=stream)
            else:
                dev = self.storage_device or k.device
                buf = _LayerBuffers(k.new_empty(k_shape, device=dev), v.new_empty(v_shape, device=dev))
            self.layers[layer] = buf
        t = k.shape[2]
        with torch.no_grad():
            if buf.stream is not None:
                buf.stream.rows_to_host(k, buf.k, offset)
                buf.event = buf.stream.rows_to_host(v, buf.v, offset)
            else:
                buf.k[:, offset:offset + t].copy_(k[0])
                buf.v[:, offset:offset + t].copy_(v[0])
        if self.offload:
            self.bytes_moved += 2 * k.numel() * k.element_size()

    def prefix(self, layer: int, lo: int, hi: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of tokens ``[lo, hi)`` as ``[1, Hkv, hi - lo, d]`` on ``device``."""
        buf = self.layers[layer]
        k, v = buf.k[:, lo:hi].unsqueeze(0), buf.v[:, lo:hi].unsqueeze(0)
        if self.offload:
            self.bytes_moved += 2 * k.numel() * k.element_size()
            if buf.stream is not None and device == buf.stream.device:  # after the writes' event, async
                return (buf.stream.rows_to_device(buf.k, lo, hi, buf.event),
                        buf.stream.rows_to_device(buf.v, lo, hi, None))
            # a real copy even when device is the CPU, so the policy costs what it would on a GPU
            k, v = k.to(device, copy=True), v.to(device, copy=True)
        return k, v

    def _grads(self, layer: int) -> _LayerBuffers:
        buf = self.layers[layer]
        if buf.dk is None:
            dtype = torch.float64 if buf.k.dtype == torch.float64 else torch.float32
            buf.dk = torch.zeros(buf.k.shape, dtype=dtype, device=buf.k.device)
            buf.dv = torch.zeros(buf.v.shape, dtype=dtype, device=buf.v.device)
        return buf

    def add_grad(self, layer: int, lo: int, hi: int, dk: torch.Tensor, dv: torch.Tensor) -> None:
        """Accumulates ``[1, Hkv, hi - lo, d]`` gradients of the prefix tokens ``[lo, hi)``."""
        buf = self._grads(layer)
        buf.dk[:, lo:hi].add_(dk[0].to(buf.dk.device, buf.dk.dtype))
        buf.dv[:, lo:hi].add_(dv[0].to(buf.dv.device, buf.dv.dtype))

    def pending_grad(self, layer: int, offset: int, length: int,
                     like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient that later chunks sent to tokens ``[offset, offset + length)``, as ``like``."""
        buf = self._grads(layer)
        sl = slice(offset, offset + length)
        return (buf.dk[:, sl].unsqueeze(0).to(like.device, like.dtype),
                buf.dv[:, sl].unsqueeze(0).to(like.device, like.dtype))

    @property
    def nbytes(self) -> int:
        """K/V buffers and their gradients, plus the recurrent mixers' states (hybrid models)."""
        total = 0
        for b in self.layers.values():
            for t in (b.k, b.v, b.dk, b.dv):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total + (self.mixers.nbytes if self.mixers is not None else 0)
