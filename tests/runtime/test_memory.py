"""ds_chunkflow/runtime/memory.py: the saved-tensor meter counts what autograd holds, and costs nothing when not asked."""

from __future__ import annotations

import torch

from ds_chunkflow.runtime.memory import ActivationMeter, saved_tensor_hooks


def _saving_forward() -> torch.Tensor:
    w = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.float64))
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    return (x @ w).exp().sum()  # saves x, w (a parameter: not counted) and exp's result


def test_counting_meter_counts_saved_activations_not_parameters():
    """A counting meter's peak is the bytes of the saved activations (x and exp's output), parameters excluded."""
    meter = ActivationMeter()
    with saved_tensor_hooks(meter):
        loss = _saving_forward()
    assert meter.peak == 2 * 4 * 8 * 8  # two float64 [4, 8] tensors
    loss.backward()
    assert meter.live == 0


def test_offload_only_meter_installs_no_hooks():
    """Without offload, an ``offload_only`` meter installs no saved-tensor hooks (a step pays nothing for it)."""
    calls = []
    meter = ActivationMeter.offload_only()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: calls.append(1) or t, lambda t: t):
        with saved_tensor_hooks(meter):
            _saving_forward().backward()
        outer = len(calls)
    # the outer hooks saw every saved tensor: nothing inside replaced them
    assert outer == 3 and meter.peak == 0 and meter.offloaded == 0


def test_offload_only_meter_still_counts_offloaded_bytes():
    """With offload, an ``offload_only`` meter counts the bytes moved (ExecStats.offloaded_bytes) but no peak."""
    meter = ActivationMeter.offload_only()
    with saved_tensor_hooks(meter, offload=True):
        loss = _saving_forward()
    assert meter.offloaded == 2 * 4 * 8 * 8 and meter.peak == 0
    loss.backward()
