"""ds_chunkflow.plan.instructions: one vocabulary, values that compare and hash by their fields."""

import dataclasses

import pytest

from ds_chunkflow.plan.chunking import build_chunks
from ds_chunkflow.plan.instructions import (
    Backward,
    EvalForward,
    Forward,
    JointBackward,
    PadBackward,
    PadEvalForward,
    PadForward,
    Recompute,
    ReleaseState,
    StateForward,
    holds_activations,
    letter,
)

ALL = [StateForward, Forward, Recompute, Backward, JointBackward, EvalForward, PadForward, PadBackward, PadEvalForward,
       ReleaseState]


def test_equal_by_fields_hashable_and_frozen():
    a, b = build_chunks([5, 3], 4).groups[0][:2]
    assert Forward(a) == Forward(a) and Forward(a) != Forward(b) and Forward(a) != Recompute(a)
    assert Forward(a) != Forward(a, offload=True)
    assert len({Forward(a), Forward(a), Backward(a)}) == 2  # usable as dict keys and in sets
    with pytest.raises(dataclasses.FrozenInstanceError):
        Forward(a).chunk = b


def test_every_instruction_has_a_letter_and_a_rough_docstring():
    assert len({letter(cls.__new__(cls)) for cls in ALL}) == len(ALL)
    for cls in ALL:
        assert "Roughly:" in cls.__doc__, cls.__name__


def test_only_forwards_with_a_graph_hold_activations():
    c = build_chunks([3], 4).standalone[0]
    assert holds_activations(Forward(c)) and holds_activations(Recompute(c))
    assert not any(holds_activations(i) for i in (StateForward(c), EvalForward(c), Backward(c), PadForward(True)))
