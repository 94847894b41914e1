"""Evaluation on the chunked path (``engine.evaluate``, ``chunked_evaluate``) against a plain
unchunked forward of the same model on the same samples (``reference.py``: nothing of ours)."""

import pytest
import torch

import ds_chunkflow
from ds_chunkflow.testing.models import build_tiny_model
from ds_chunkflow.testing.spawn import run_ranks
from tests.helpers.eval_workers import eval_matches, eval_set, train_with_evals
from tests.helpers.reference import make_sequences, reference_loss_and_grads


def plain_loss(params, vocab_size) -> float:
    model = build_tiny_model("qwen2", seed=0)
    model.load_state_dict(params, strict=False)  # tied head: one tensor under two names
    with torch.no_grad():
        loss, _ = reference_loss_and_grads(model, eval_set(vocab_size), backward=False)
    return loss.item()


@pytest.mark.parametrize("chunk_size", [4, 16, 64])
def test_chunked_evaluate_float64_equals_plain_forward(chunk_size):
    """float64: the chunked forward-only loss (split, packed, one sample without labels) equals the
    plain full-sequence forward's sum CE / label tokens to 1e-12."""
    model = build_tiny_model("qwen2", seed=0, dtype=torch.float64)
    seqs = eval_set(model.config.vocab_size)
    with torch.no_grad():
        ref, _ = reference_loss_and_grads(model, seqs, backward=False)
    got = ds_chunkflow.chunked_evaluate(model, seqs, chunk_size=chunk_size, loss_piece_tokens=3)
    assert abs(got.item() - ref.item()) / ref.item() < 1e-12, (got.item(), ref.item())
    assert all(p.grad is None for p in model.parameters()), "evaluation made gradients"


def test_chunked_evaluate_refuses_a_set_without_labels():
    """A set with no label token has no loss: an error, not a NaN."""
    model = build_tiny_model("qwen2", seed=0)
    seqs = make_sequences([5, 20], model.config.vocab_size, all_masked=(0, 1))
    with pytest.raises(ValueError, match="no label tokens"):
        ds_chunkflow.chunked_evaluate(model, seqs, chunk_size=8)


@pytest.mark.distributed
@pytest.mark.parametrize("world,stage", [(1, 3), (2, 2), (2, 3)])
def test_engine_evaluate_equals_plain_forward(tmp_path, world, stage):
    """engine.evaluate (ZeRO-2/3, 1 and 2 ranks, samples longer than a chunk and packed ones, the
    set planned whole and in batches of 4) equals the plain forward's loss to 1e-5 (float32),
    before and after a training step."""
    out = tmp_path / "eval.pt"
    run_ranks(eval_matches, stage, str(out), {"keep_chunks": 2}, world=world)
    result = torch.load(out)
    vocab = build_tiny_model("qwen2").config.vocab_size
    before = plain_loss(build_tiny_model("qwen2", seed=0).state_dict(), vocab)
    after = plain_loss(result["params"], vocab)
    assert abs(before - after) > 1e-3, "the training step changed nothing: the second comparison is empty"
    for got, ref in zip(result["losses"], [before, after]):
        assert abs(got - ref) / ref < 1e-5, (result["losses"], before, after)
    labels = sum(int((s["labels"][1:] != -100).sum()) for s in eval_set(vocab))
    assert result["last_eval"]["tokens"] == labels


@pytest.mark.distributed
def test_engine_evaluate_with_sequence_parallelism(tmp_path):
    """With sequence parallelism on (the 70-token sample spread over both ranks) the loss is still
    the plain forward's."""
    out = tmp_path / "eval.pt"
    run_ranks(eval_matches, 2, str(out), {"sequence_parallel": {"max_size": 2}})
    result = torch.load(out)
    vocab = build_tiny_model("qwen2").config.vocab_size
    ref = plain_loss(build_tiny_model("qwen2", seed=0).state_dict(), vocab)
    assert abs(result["losses"][0] - ref) / ref < 1e-5, (result["losses"][0], ref)


@pytest.mark.distributed
def test_evaluation_leaves_training_bitwise_unchanged(tmp_path):
    """2 ranks, ZeRO-3, dropout on: training with an evaluation before every step is bitwise the
    training without (losses and every parameter)."""
    runs = []
    for evaluate in (False, True):
        out = tmp_path / f"train_{evaluate}.pt"
        run_ranks(train_with_evals, 3, 3, evaluate, str(out))
        runs.append(torch.load(out))
    assert runs[0]["losses"] == runs[1]["losses"]
    for name, p in runs[0]["params"].items():
        assert torch.equal(p, runs[1]["params"][name]), name
