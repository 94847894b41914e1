"""ds_chunkflow.runtime.chunk.ChunkRuntime: the one object that runs a chunk, whoever calls it."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ds_chunkflow.constants import IGNORE_INDEX
from ds_chunkflow.plan.chunking import build_chunks
from ds_chunkflow.runtime.chunk import ChunkRuntime, Mode, head_loss
from tests.helpers.reference import make_sequences

READS = {"item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__"}


class DeviceReads(TorchFunctionMode):
    """Counts the calls that would make the host wait for a GPU."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _runtime(lengths=(10,), chunk_size=4, **kw):
    seqs = make_sequences(list(lengths), vocab_size=50, seed=0)
    layout = build_chunks(list(lengths), chunk_size)
    return ChunkRuntime(seqs, torch.device("cpu"), num_loss_tokens=7, require_attention=False, **kw), layout


def test_recompute_replays_the_rng_of_the_first_forward():
    """A state-only forward and its recompute draw the same dropout masks, whatever ran in between."""
    rt, layout = _runtime()
    chunk = layout.groups[0][0]
    x = torch.ones(1000)

    def call(ctx):
        return torch.nn.functional.dropout(x, 0.5)

    first = rt.forward(chunk, call, Mode.STATE)
    torch.rand(123)  # other chunks' forwards move the generator on
    again = rt.forward(chunk, call, Mode.RECOMPUTE)
    fresh = rt.forward(layout.groups[0][1], call, Mode.KEEP)
    assert torch.equal(first, again) and not torch.equal(first, fresh)


def test_modes_build_a_graph_only_for_kept_and_recomputed_chunks():
    rt, layout = _runtime()
    w = torch.ones(3, requires_grad=True)
    chunks = layout.groups[0]
    graphs = {mode: rt.forward(c, lambda ctx: (w * 2).sum(), mode).requires_grad
              for c, mode in zip(chunks, [Mode.STATE, Mode.KEEP, Mode.EVAL])}
    graphs[Mode.RECOMPUTE] = rt.forward(chunks[0], lambda ctx: (w * 2).sum(), Mode.RECOMPUTE).requires_grad
    assert graphs == {Mode.STATE: False, Mode.KEEP: True, Mode.EVAL: False, Mode.RECOMPUTE: True}


def test_the_loss_stays_on_the_device():
    """The chunk loss and its running sum read nothing back to the host (rows found when the inputs
    were cut); the sum is the sum of the chunk losses."""
    rt, layout = _runtime(lengths=(6, 5))
    head = torch.nn.Linear(8, 50).double()
    total = 0.0
    for chunk in layout.standalone + [c for g in layout.groups for c in g]:
        inputs = rt.inputs(chunk)
        hidden = torch.randn(1, inputs.input_ids.shape[1], 8, dtype=torch.float64)
        with DeviceReads() as reads:
            loss = rt.loss(head, hidden, inputs)
        assert reads.calls == [], reads.calls
        total += loss.item()
    assert rt.loss_sum.item() == pytest.approx(total, rel=1e-12)


def test_target_rows_give_the_same_loss_as_finding_them():
    targets = torch.tensor([[IGNORE_INDEX, 3, 9, IGNORE_INDEX, 1, IGNORE_INDEX]])
    hidden = torch.randn(1, 6, 8, dtype=torch.float64)
    head = torch.nn.Linear(8, 12).double()
    rows = (targets[0] != IGNORE_INDEX).nonzero().squeeze(1)
    assert torch.equal(head_loss(head, hidden, targets, 3, 2, rows), head_loss(head, hidden, targets, 3, 2))


def test_release_frees_a_groups_state_and_nothing_is_left_pending():
    rt, layout = _runtime()
    chunk = layout.groups[0][0]
    rt.forward(chunk, lambda ctx: None, Mode.KEEP)
    assert rt.pending and chunk.group in rt.states
    rt.backward_done(chunk)
    rt.release(chunk.group)
    assert not rt.pending and not rt.states
