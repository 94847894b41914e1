"""Saved-tensor hooks: count the activation bytes autograd holds, offload them to the CPU.

``saved_tensors_hooks`` see every tensor a forward saves for its backward. Counting them
per unique storage (parameters excluded) gives the activation memory of a step exactly,
independently of the allocator; moving them to the CPU is activation offload (on CUDA:
pinned host memory, copies on a side stream, see :mod:`ds_chunkflow.ops.cuda_streams`).
"""

from __future__ import annotations

import contextlib
import resource
from dataclasses import dataclass, field

import torch

from ds_chunkflow.ops.cuda_streams import CopyStream, copy_stream


@dataclass
class ActivationMeter:
    """Live and peak bytes of tensors saved for backward (parameters excluded).

    ``counting=False`` (:meth:`offload_only`, what a training step gets unless it passes a meter)
    counts only the offloaded bytes: without offload it installs no hooks at all, so a step pays
    nothing per saved tensor.
    """

    live: int = 0
    peak: int = 0
    offloaded: int = 0
    counting: bool = True
    _refs: dict = field(default_factory=dict)

    @classmethod
    def offload_only(cls) -> "ActivationMeter":
        return cls(counting=False)

    def _acquire(self, t: torch.Tensor) -> object:
        key = (t.untyped_storage().data_ptr(), t.device)
        count = self._refs.get(key, 0)
        if count == 0:
            self.live += t.untyped_storage().nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[key] = count + 1
        return _Handle(self, key, t.untyped_storage().nbytes())

    def _release(self, key, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.live


class _Handle:
    __slots__ = ("meter", "key", "nbytes")

    def __init__(self, meter, key, nbytes):
        self.meter, self.key, self.nbytes = meter, key, nbytes

    def __del__(self):
        self.meter._release(self.key, self.nbytes)


def _is_parameter(t: torch.Tensor) -> bool:
    # ``isinstance(t, Parameter)`` goes through Parameter's Python metaclass check on every saved
    # tensor; a plain tensor (the usual case) is answered by its exact type first.
    return type(t) is not torch.Tensor and isinstance(t, torch.nn.Parameter)


@contextlib.contextmanager
def saved_tensor_hooks(meter: ActivationMeter | None = None, offload: bool = False):
    """Counts saved tensors into ``meter``; with ``offload`` keeps them on the CPU until backward.

    The copy is real even on a CPU-only machine, so the policy's cost is measured too. On CUDA
    the host copy is pinned and made on a side stream (:mod:`ds_chunkflow.ops.cuda_streams`); the
    backward's unpack waits for it.
    """
    count = meter is not None and meter.counting
    if not count and not offload:
        yield
        return

    def pack(t: torch.Tensor):
        if _is_parameter(t) or (t._base is not None and _is_parameter(t._base)):  # a weight, or its .t()
            return (t, None, None)
        if offload:
            if meter is not None:
                meter.offloaded += t.numel() * t.element_size()
            stream = copy_stream(t.device)
            if stream is not None:  # CUDA: pinned, on the side stream, overlapped with the forward
                host, event = stream.to_host(t)
                return (host, stream, event)
            cpu = torch.empty(t.size(), dtype=t.dtype, layout=t.layout)
            cpu.copy_(t)
            return (cpu, t.device, None)
        return (t, None, meter._acquire(t) if count else None)

    def unpack(packed):
        t, where, extra = packed
        if isinstance(where, CopyStream):
            return where.to_device(t, extra)  # waits for the copy to the host first
        return t.to(where, non_blocking=True) if where is not None else t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def peak_rss_bytes() -> int:
    """Process peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
