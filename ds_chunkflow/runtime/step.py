"""The public exact chunked step: ``chunked_forward_backward``."""

from __future__ import annotations

from typing import Sequence

import torch

from ds_chunkflow.config import ChunkFlowConfig
from ds_chunkflow.hf.guard import check_model
from ds_chunkflow.runtime.batch import SequenceDict, count_loss_tokens
from ds_chunkflow.runtime.batch_plan import plan_batch
from ds_chunkflow.runtime.chunk import ChunkRuntime, hooks, num_loss_pieces
from ds_chunkflow.runtime.executor import ExecStats, Executor, no_backward
from ds_chunkflow.runtime.memory import ActivationMeter

LOSS_PIECE_TOKENS = ChunkFlowConfig.model_fields["loss_piece_tokens"].default  # the config's default


def chunked_step(model, sequences: Sequence[SequenceDict], *, chunk_size: int, keep_chunks: int = 1,
                 num_loss_tokens: int | None = None, offload_activations: bool = False,
                 state_offload_min_tokens: int | None = None, meter: ActivationMeter | None = None,
                 loss_piece_tokens: int = LOSS_PIECE_TOKENS) -> ExecStats:
    """Like :func:`chunked_forward_backward`, returning the run's statistics too."""
    check_model(model)  # refuses, before anything reaches .grad, what would not be exact (cached)
    batch = plan_batch(sequences, chunk_size=chunk_size, keep_chunks=keep_chunks,  # one process: nothing collective
                       offload_activations=offload_activations, num_loss_tokens=num_loss_tokens,
                       forwards_collective=False)
    device = next(model.parameters()).device
    runtime = ChunkRuntime(batch.sequences, device, batch.num_loss_tokens,
                           num_loss_pieces(chunk_size, loss_piece_tokens), state_offload_min_tokens,
                           meter=meter or ActivationMeter.offload_only())
    executor = Executor(model, lambda loss, _boundary: loss.backward(), runtime, model=model)
    with hooks(model):
        return executor.run(batch.rank_plans[0])


def chunked_forward_backward(model, sequences: Sequence[SequenceDict], chunk_size: int, keep_chunks: int = 1,
                             num_loss_tokens: int | None = None, **options) -> torch.Tensor:
    """Adds to every parameter's ``.grad`` the gradient of the batch loss; returns the loss.

    ``L = sum(next-token CE over all label positions) / num_loss_tokens`` (default: the
    number of label positions in ``sequences``). Sequences longer than ``chunk_size`` are
    split into dependent chunks, shorter ones packed; at most ``keep_chunks`` chunks of a
    sequence hold activations at once. The gradients equal those of unchunked training.
    ``options``: ``offload_activations``, ``state_offload_min_tokens``, ``meter``, ``loss_piece_tokens``
    (target rows per piece of the chunked lm_head + cross-entropy).

    A model ChunkFlow cannot train exactly is refused with
    :class:`~ds_chunkflow.hf.guard.ModelRefused` at its first call (see :mod:`ds_chunkflow.hf.guard`).
    """
    stats = chunked_step(model, sequences, chunk_size=chunk_size, keep_chunks=keep_chunks,
                         num_loss_tokens=num_loss_tokens, **options)
    dtype = next(model.parameters()).dtype
    return stats.loss.to(torch.float64 if dtype == torch.float64 else torch.float32)


def chunked_evaluate(model, sequences: Sequence[SequenceDict], chunk_size: int,
                     loss_piece_tokens: int = LOSS_PIECE_TOKENS) -> torch.Tensor:
    """``sum(next-token CE over all label positions) / their count`` of ``sequences`` by the chunked
    forward without backward (no graph; a long sequence's chunks run in order with the K/V state of
    the ones before). Equals the model's plain forward; the module's train/eval mode is left as it is."""
    check_model(model)
    num_loss_tokens = count_loss_tokens(sequences)
    if num_loss_tokens == 0:
        raise ValueError("chunked_evaluate: the sequences have no label tokens (every label is -100)")
    batch = plan_batch(sequences, chunk_size=chunk_size, keep_chunks=1, evaluation=True)
    device = next(model.parameters()).device
    runtime = ChunkRuntime(batch.sequences, device, 1, num_loss_pieces(chunk_size, loss_piece_tokens))
    with hooks(model):
        total = Executor(model, no_backward, runtime, model=model).run(batch.rank_plans[0]).loss
    dtype = next(model.parameters()).dtype
    return (total / num_loss_tokens).to(torch.float64 if dtype == torch.float64 else torch.float32)
