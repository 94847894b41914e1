"""Offload copies on CUDA: pinned host memory, a side stream for device -> host, events.

    forward (compute stream)  ──produce t──▶ ...more compute...
    side stream               wait(compute) ─ copy t -> pinned host ─ record event E
    later (compute stream)    wait(E) ─ copy host -> device (non_blocking) ─ use

* ``to_host``: the side stream first waits for the compute stream (``t`` is written), then
  copies into pinned memory without blocking the host, so the forward keeps running while
  the copy is in flight; ``t.record_stream(side)`` keeps the caching allocator from handing
  ``t``'s memory to anyone before the copy has finished, even though its last Python
  reference goes away at once. Returns the host tensor and the copy's event.
* ``to_device``: the compute stream waits for that event, then copies back (async from
  pinned memory); every later kernel on the compute stream is ordered after it. PyTorch's
  pinned-memory allocator records its own event on such a copy, so the host block is not
  reused before it is read.

On a CPU device none of this exists: ``to_host`` is a synchronous copy and no events are
made (the CPU code path is exactly what it was before). A ``CopyStream`` counts what went
through it (``bytes_to_host``, ``bytes_pinned``: of those, into pinned memory; ``bytes_to_device``):
the executor's byte counts grow on the CPU fallback too, these only on the side-stream path, so
they are what tells a GPU run that the path ran. The CUDA calls go through a small
``api`` object so the ordering can be tested on CPU with a recording stand-in
(``tests/ops/test_cuda_streams.py``); the real one is only exercised by ``pytest -m gpu``.
"""

from __future__ import annotations

import contextlib

import torch


class TorchCuda:
    """The CUDA calls the copies need (the real ``torch.cuda``)."""

    def current_stream(self, device):
        return torch.cuda.current_stream(device)

    def new_stream(self, device):
        return torch.cuda.Stream(device)

    def stream(self, s):
        return torch.cuda.stream(s)

    def wait_stream(self, waiter, other) -> None:
        waiter.wait_stream(other)

    def record_event(self, s):
        event = torch.cuda.Event()
        event.record(s)
        return event

    def wait_event(self, s, event) -> None:
        s.wait_event(event)

    def record_stream(self, t: torch.Tensor, s) -> None:
        t.record_stream(s)

    def pinned_empty(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)


class CopyStream:
    """Device <-> host copies of one CUDA device (see the module docstring)."""

    def __init__(self, device: torch.device, api=None):
        self.device, self.api = device, api or TorchCuda()
        self.side = self.api.new_stream(device)
        self.bytes_to_host = self.bytes_pinned = self.bytes_to_device = 0

    def pinned_empty(self, shape, dtype) -> torch.Tensor:
        return self.api.pinned_empty(shape, dtype)

    def to_host(self, src: torch.Tensor, dst: torch.Tensor | None = None):
        """Starts copying ``src`` into ``dst`` (default: a new pinned tensor); returns ``(dst, event)``."""
        if dst is None:
            dst = self.api.pinned_empty(src.shape, src.dtype)
        self.api.wait_stream(self.side, self.api.current_stream(self.device))
        with self.api.stream(self.side):
            dst.copy_(src, non_blocking=True)
        event = self.api.record_event(self.side)
        self.api.record_stream(src, self.side)
        size = src.numel() * src.element_size()
        self.bytes_to_host += size
        self.bytes_pinned += size if dst.is_pinned() else 0
        return dst, event

    def to_device(self, host: torch.Tensor, event, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``host`` on the device, after the copy that filled it (``event``, may be None) has finished."""
        if event is not None:
            self.api.wait_event(self.api.current_stream(self.device), event)
        self.bytes_to_device += host.numel() * host.element_size()
        return host.to(self.device, dtype or host.dtype, non_blocking=True)

    def rows_to_host(self, src: torch.Tensor, host: torch.Tensor, offset: int):
        """Starts copying ``src [1, H, T, d]`` into rows ``[offset, offset + T)`` of ``host [H, S, d]``; returns
        the event of the last copy. One copy per head: each head's rows are contiguous in ``host``, so every
        copy is a direct async DMA (a strided host destination would go through a synchronous host temp)."""
        event = None
        for h in range(src.shape[1]):
            _, event = self.to_host(src[0, h], host[h, offset:offset + src.shape[2]])
        return event

    def rows_to_device(self, host: torch.Tensor, lo: int, hi: int, event) -> torch.Tensor:
        """Rows ``[lo, hi)`` of ``host [H, S, d]`` as ``[1, H, hi - lo, d]`` on the device, ordered after ``event``
        (the last write into ``host``) on the compute stream; one contiguous async copy per head."""
        out = torch.empty((1, host.shape[0], hi - lo, host.shape[2]), dtype=host.dtype, device=self.device)
        if event is not None:
            self.api.wait_event(self.api.current_stream(self.device), event)
        for h in range(host.shape[0]):
            out[0, h].copy_(host[h, lo:hi], non_blocking=True)
        self.bytes_to_device += out.numel() * out.element_size()
        return out


_streams: dict[torch.device, CopyStream] = {}


def copy_stream(device: torch.device) -> CopyStream | None:
    """The process's copy stream for a CUDA ``device`` (one per device); None for other devices."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _streams:
        if device.type != "cuda":
            return None
        _streams[device] = CopyStream(device)
    return _streams[device]


@contextlib.contextmanager
def using(streams: dict[torch.device, CopyStream]):
    """Test hook: ``copy_stream`` answers from ``streams`` inside the block (any device type, so the CUDA
    path can run on CPU with a recording ``api``)."""
    saved = dict(_streams)
    _streams.clear()
    _streams.update(streams)
    try:
        yield
    finally:
        _streams.clear()
        _streams.update(saved)
