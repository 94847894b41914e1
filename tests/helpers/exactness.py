"""Chunked training against the plain reference (tests/helpers/reference.py): the comparison every exactness test makes."""

import ds_chunkflow
from tests.helpers.reference import grads_of, max_rel_err, reference_loss_and_grads


def chunked_errors(model, seqs, chunk_size, keep_chunks=1, **options):
    """(relative loss error, worst relative gradient error) of ``chunked_forward_backward`` against the
    full-sequence reference on the same model and sequences (``options`` go to the chunked step)."""
    model.zero_grad(set_to_none=True)
    ref_loss, ref_grads = reference_loss_and_grads(model, seqs)
    model.zero_grad(set_to_none=True)
    loss = ds_chunkflow.chunked_forward_backward(model, seqs, chunk_size=chunk_size, keep_chunks=keep_chunks,
                                                 **options)
    return abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()), max_rel_err(grads_of(model), ref_grads)
