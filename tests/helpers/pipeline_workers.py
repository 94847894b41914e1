"""Spawned-rank functions for the pipeline tests (importable by name), and their references."""

import torch

from ds_chunkflow.testing.families import EXACT, build
from tests.helpers import workers
from tests.helpers.workers import LR, ds_config, global_batch


def _exact(family, **more):
    """(model_type, overrides) of a ``families.EXACT`` entry, with ``more`` overrides."""
    model_type, _, overrides = EXACT[family][:3]
    return model_type, {**overrides, **more}


# family -> (model_type, overrides); tied ones share the embedding with the head
PIPE_FAMILIES = {
    "llama": ("llama", {}),
    "qwen2_tied": _exact("qwen2_tied"),
    "mistral_window": _exact("mistral_window"),  # sliding window 12 < chunk 16
    "granite": _exact("granite"),  # embedding multiplier, logits / logits_scaling
    "cohere_tied": _exact("cohere", tie_word_embeddings=True),  # logits * logit_scale
    "gemma3_tied": _exact("gemma3_text", final_logit_softcapping=30.0),  # softcap, rope per layer type, sliding
    "qwen3": _exact("qwen3"),
    "qwen3_next": _exact("qwen3_next"),  # a hybrid: gated delta nets carry their recurrent state per stage
}
TOY = "toy"  # ds_chunkflow.testing.models's Qwen2, float32


def build_model(family):
    """float32 (DeepSpeed's pipeline engine reduces no float64 gradients), seed 0; ``TOY`` is
    ``build_tiny_model("qwen2")``."""
    if family == TOY:
        from ds_chunkflow.testing.models import build_tiny_model

        return build_tiny_model("qwen2", seed=0)
    model_type, overrides = PIPE_FAMILIES[family]
    return build(model_type, overrides, dtype=torch.float32, seed=0)


def _sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)  # as workers.reference_steps


def _pipeline_engine(model, stage=0, **chunkflow):
    import ds_chunkflow
    from ds_chunkflow.pipeline.model import pipeline_module

    module = pipeline_module(model, num_stages=2)
    engine, *_ = ds_chunkflow.initialize(model=module, optimizer=_sgd(module.parameters()),
                                         config=ds_config(stage, **chunkflow))
    return engine


def train_pipeline(rank, world, stage, steps, out_path, keep_chunks=1, families=(TOY,), offload="none"):
    """2 pipeline stages, per family; each rank saves the losses, its stage's parameters (HF names) and the
    last step's metrics. ``offload``: ``chunkflow.offload.activations``."""
    import ds_chunkflow

    ds_chunkflow.init_distributed()
    results = {}
    for family in families:
        model = build_model(family)
        engine = _pipeline_engine(model, stage, keep_chunks=keep_chunks, offload={"activations": offload})
        losses = [engine.train_batch(global_batch(s, model.config.vocab_size)).item() for s in range(steps)]
        mine = {id(p) for p in engine.module.parameters()}
        state = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in mine}
        results[family] = {"losses": losses, "state": state, "metrics": dict(engine.last_metrics)}
    torch.save(results, f"{out_path}.{rank}")


def reference_steps(family, steps):
    """Single process, plain PyTorch: the same model, optimizer and global batches."""
    return workers.reference_steps(steps, build_model(family))


def pipeline_refuses_zero2(rank, world, out_path):
    import ds_chunkflow

    ds_chunkflow.init_distributed()
    try:
        _pipeline_engine(build_model(TOY), stage=2)
    except ds_chunkflow.ConfigError as e:
        with open(f"{out_path}.{rank}", "w") as f:
            f.write(str(e))


def planning_errors_agree(rank, world, out_path):
    """Rank 0 alone gets an over-long sample, then the ranks get different batches: all must raise."""
    import ds_chunkflow
    from tests.helpers.reference import make_sequences

    ds_chunkflow.init_distributed()
    engine = _pipeline_engine(build_model(TOY), max_seq_len=40)
    errors = []
    for lengths in ([20, 50 if rank == 0 else 30], [20, 30 + 5 * rank]):
        try:
            engine.train_batch(make_sequences(lengths, 128))
        except (ValueError, RuntimeError) as e:
            errors.append(f"{type(e).__name__}: {e}")
    with open(f"{out_path}.{rank}", "w") as f:
        f.write("\n".join(errors))


INJECTED = "injected failure in a decoder layer on rank 0"


def fails_on_one_stage(rank, world):
    """Rank 0's first decoder layer raises during train_batch while rank 1 waits for its activations."""
    import ds_chunkflow

    ds_chunkflow.init_distributed()
    model = build_model(TOY)
    engine = _pipeline_engine(model)
    if rank == 0:
        def fail(*args, **kwargs):
            raise RuntimeError(INJECTED)

        model.model.layers[0].forward = fail
    engine.train_batch(global_batch(0, model.config.vocab_size))
