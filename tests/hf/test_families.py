"""The family matrix: every transformers causal LM family trains exactly under ChunkFlow, or is refused.

float64, K in {1, 2, N}, packed and split samples, against the plain full-sequence
reference in :mod:`reference` (stock attention, one call per sequence).
"""

import pytest
import torch

import ds_chunkflow
from ds_chunkflow.hf.guard import ModelRefused
from ds_chunkflow.testing.families import EXACT, REFUSED, build, exact_case
from tests.helpers.reference import grads_of, make_sequences, max_rel_err, reference_loss_and_grads

CHUNK = 8
LENGTHS = [37, 11, 5, 3, 1]  # 37 = 5 dependent chunks; the rest packed


@pytest.mark.parametrize("family", sorted(EXACT))
def test_family_matches_full_sequence_training(family):
    """Loss and every parameter gradient equal unchunked training for K = 1, 2 and N (float64)."""
    model_type, _, overrides, tol = exact_case(family)
    model = build(model_type, overrides)
    seqs = make_sequences(LENGTHS, model.config.vocab_size)
    model.zero_grad(set_to_none=True)
    ref_loss, ref_grads = reference_loss_and_grads(model, seqs)
    for keep in (1, 2, 5):
        model.zero_grad(set_to_none=True)
        loss = ds_chunkflow.chunked_forward_backward(model, seqs, chunk_size=CHUNK, keep_chunks=keep)
        loss_err = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
        grad_err = max_rel_err(grads_of(model), ref_grads)
        assert loss_err < tol and grad_err < tol, (family, keep, loss_err, grad_err)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_family_is_refused_before_training(family):
    """Models ChunkFlow cannot train exactly (attention outside the attention interface, a forward that never runs
    its base model) are refused with a message naming the class and the reason, and nothing reaches .grad."""
    model_type, _, overrides, reason = REFUSED[family]
    model = build(model_type, overrides, dtype=torch.float32)
    seqs = make_sequences([20, 5], model.config.vocab_size)
    with pytest.raises(ModelRefused, match=reason) as info:
        ds_chunkflow.chunked_forward_backward(model, seqs, chunk_size=CHUNK)
    assert type(model).__name__ in str(info.value)
    assert all(p.grad is None for p in model.parameters())
