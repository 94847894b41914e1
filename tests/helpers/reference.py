"""The plain PyTorch reference every exactness test compares against.

Each sequence runs whole through the model with its stock attention; the loss is the
summed next-token cross-entropy over all label positions divided by their count; one
backward. Nothing from ds_chunkflow is used here.
"""

import torch
import torch.nn.functional as F


def make_sequences(lengths, vocab_size, seed=0, mask_prompt=True, all_masked=()):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, vocab_size, (n,), generator=g)
        labels = ids.clone()
        if mask_prompt:
            labels[: n // 3] = -100
        if i in all_masked:
            labels[:] = -100
        seqs.append({"input_ids": ids, "labels": labels})
    return seqs


def reference_loss_and_grads(model, sequences, num_loss_tokens=None, backward=True):
    total, count = 0.0, 0
    for s in sequences:
        logits = model(input_ids=s["input_ids"][None]).logits[0]
        targets = torch.cat([s["labels"][1:], torch.tensor([-100])])
        logits = logits if logits.dtype == torch.float64 else logits.float()
        total = total + F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    loss = total / (num_loss_tokens or count)
    if backward:
        loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_rel_err(grads, ref):
    """max over parameters of max|g - r| / max|r| (a parameter with zero reference gradient: absolute)."""
    worst = 0.0
    assert grads.keys() == ref.keys(), set(grads) ^ set(ref)
    for name, r in ref.items():
        scale = r.abs().max().item() or 1.0
        worst = max(worst, (grads[name].double() - r.double()).abs().max().item() / scale)
    return worst


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
