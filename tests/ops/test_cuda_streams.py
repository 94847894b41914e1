"""Ordering of the offload copies (ds_chunkflow.ops.cuda_streams), on CPU with a recording stand-in for torch.cuda.

The stand-in logs every stream call; the copies themselves are real (CPU) copies, so the
whole CUDA code path of activation and K/V-state offload runs and must stay exact.
"""

import contextlib

import torch

import ds_chunkflow
from ds_chunkflow.ops import cuda_streams
from ds_chunkflow.ops.cuda_streams import CopyStream
from ds_chunkflow.testing.models import build_tiny_model
from tests.helpers.reference import grads_of, make_sequences

CPU = torch.device("cpu")


class RecordingCuda:
    """``cuda_streams.TorchCuda``'s interface; streams are the strings 'compute' and 'side'."""

    def __init__(self):
        self.log, self.events, self.active = [], 0, "compute"

    def current_stream(self, device):
        return self.active

    def new_stream(self, device):
        return "side"

    @contextlib.contextmanager
    def stream(self, s):
        before, self.active = self.active, s
        self.log.append(("enter", s))
        yield
        self.log.append(("exit", s))
        self.active = before

    def wait_stream(self, waiter, other):
        self.log.append(("wait_stream", waiter, other))

    def record_event(self, s):
        self.events += 1
        self.log.append(("record", s, self.events))
        return self.events

    def wait_event(self, s, event):
        self.log.append(("wait_event", s, event))

    def record_stream(self, t, s):
        self.log.append(("record_stream", s))

    def pinned_empty(self, shape, dtype):
        self.log.append(("pinned",))
        return torch.empty(shape, dtype=dtype)


def _copies_are_ordered(log):
    """Every device->host copy: the side stream waits for the compute stream, copies, records its event and
    protects the source (record_stream); every wait is for an event recorded before."""
    recorded = set()
    starts = [i for i, e in enumerate(log) if e == ("wait_stream", "side", "compute")]
    assert starts
    for i in starts:
        assert log[i + 1:i + 5] == [("enter", "side"), ("exit", "side"), ("record", "side", log[i + 3][2]),
                                    ("record_stream", "side")], log[i:i + 5]
    for e in log:
        if e[0] == "record":
            recorded.add(e[2])
        if e[0] == "wait_event":
            assert e[1] == "compute" and e[2] in recorded, e
    return recorded, {e[2] for e in log if e[0] == "wait_event"}


def test_to_host_and_back():
    """to_host copies into pinned memory on the side stream after it waited for compute; to_device makes the
    compute stream wait for that copy's event; the values survive the round trip."""
    api = RecordingCuda()
    s = CopyStream(CPU, api)
    t = torch.randn(3, 4)
    host, event = s.to_host(t)
    back = s.to_device(host, event)
    assert torch.equal(back, t) and api.log[0] == ("pinned",)
    recorded, waited = _copies_are_ordered(api.log)
    assert recorded == waited == {event}


def test_rows_round_trip():
    """rows_to_host writes rows [offset, offset+T) of every head (one copy per head, the last event returned);
    rows_to_device reads [lo, hi) after waiting for it."""
    api = RecordingCuda()
    s = CopyStream(CPU, api)
    host = torch.zeros(2, 10, 3)
    src = torch.randn(1, 2, 4, 3)
    event = s.rows_to_host(src, host, 5)
    assert torch.equal(host[:, 5:9], src[0]) and host[:, :5].abs().sum() == 0 and host[:, 9:].abs().sum() == 0
    assert event == 2  # two heads, two copies
    out = s.rows_to_device(host, 4, 9, event)
    assert out.shape == (1, 2, 5, 3) and torch.equal(out[0, :, 1:], src[0])
    _copies_are_ordered(api.log)


def test_offload_through_the_cuda_path_is_exact_and_ordered():
    """With the CUDA copy path forced on (recording stand-in), activation offload and K/V-state offload give
    bitwise the gradients of the run without offload; every copy back waits (on the compute stream) for the event
    of an earlier device->host copy."""
    model = build_tiny_model("qwen2")
    seqs = make_sequences([70, 20, 5], model.config.vocab_size)
    model.zero_grad(set_to_none=True)
    base = ds_chunkflow.chunked_step(model, seqs, chunk_size=16, keep_chunks=1)
    base_grads = grads_of(model)
    for options in (dict(offload_activations=True), dict(state_offload_min_tokens=0)):
        api = RecordingCuda()
        model.zero_grad(set_to_none=True)
        stream = CopyStream(CPU, api)
        with cuda_streams.using({CPU: stream}):
            stats = ds_chunkflow.chunked_step(model, seqs, chunk_size=16, keep_chunks=1, **options)
        assert stream.bytes_to_host > 0 and stream.bytes_to_device > 0, options
        grads = grads_of(model)
        assert stats.loss == base.loss and all(torch.equal(grads[n], base_grads[n]) for n in grads), options
        recorded, waited = _copies_are_ordered(api.log)
        if "offload_activations" in options:
            assert stats.offloaded_bytes > 0
        else:
            assert stats.state_bytes_moved > 0
        assert waited and waited <= recorded  # (a saved tensor no backward node reads is never unpacked)


def test_stream_counters_tell_the_side_stream_path_from_the_fallback():
    """The executor's byte counts grow on the CPU fallback too, so they cannot show that the side-stream path ran;
    the copy stream's own counters can: nothing on the fallback (no stream), every device -> host byte of the
    side-stream path counted (activation offload: exactly the bytes the executor reports offloaded), and counted
    as pinned only when the host buffer is pinned (the recording stand-in's are not)."""
    model = build_tiny_model("qwen2")
    seqs = make_sequences([70, 20, 5], model.config.vocab_size)
    options = dict(offload_activations=True)
    fallback = ds_chunkflow.chunked_step(model, seqs, chunk_size=16, keep_chunks=1, **options)
    assert fallback.offloaded_bytes > 0 and cuda_streams.copy_stream(CPU) is None
    stream = CopyStream(CPU, RecordingCuda())
    with cuda_streams.using({CPU: stream}):
        stats = ds_chunkflow.chunked_step(model, seqs, chunk_size=16, keep_chunks=1, **options)
    assert stream.bytes_to_host == stats.offloaded_bytes == fallback.offloaded_bytes > 0
    assert stream.bytes_pinned == 0
    s = CopyStream(CPU, RecordingCuda())
    s.to_host(torch.ones(3, 4), torch.empty(3, 4))
    s.rows_to_host(torch.ones(1, 2, 5, 3), torch.zeros(2, 8, 3), 1)
    assert s.bytes_to_host == 4 * (12 + 30) and s.bytes_pinned == 0
    s.rows_to_device(torch.zeros(2, 8, 3), 2, 6, None)
    assert s.bytes_to_device == 4 * 24
