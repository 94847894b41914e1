"""ds_chunkflow.runtime.executor: one handler per instruction, unknown ones refused, time accounted."""

import pytest
import torch

from ds_chunkflow.plan.chunking import assign_to_ranks, build_chunks
from ds_chunkflow.plan.schedule import Step, build_plan
from ds_chunkflow.runtime.chunk import ChunkRuntime, hooks
from ds_chunkflow.runtime.executor import TIME_CATEGORY, Executor
from ds_chunkflow.testing.models import build_tiny_model
from tests.helpers.reference import make_sequences


def _executor(lengths=(9, 3, 2)):
    model = build_tiny_model("qwen2", seed=0)
    seqs = make_sequences(list(lengths), model.config.vocab_size)
    share, = assign_to_ranks(build_chunks(list(lengths), 4), 1)
    runtime = ChunkRuntime(seqs, torch.device("cpu"), num_loss_tokens=10)
    return Executor(model, lambda loss, boundary: loss.backward(), runtime, model=model), share, model


def test_an_unknown_instruction_is_refused():
    executor, _, model = _executor()

    class Mystery:
        pass

    with hooks(model), pytest.raises(TypeError, match="no handler"):
        executor.run([Step(fwd=[Mystery()])])


def test_every_instruction_kind_is_timed_and_the_parts_add_up():
    executor, share, model = _executor()
    plan = build_plan(share, keep_chunks=1)
    with hooks(model):
        stats = executor.run(plan)
    kinds = {TIME_CATEGORY[type(ins)] for step in plan for ins in step.instructions()}
    assert kinds <= set(stats.seconds) and "other" in stats.seconds
    assert {"forward", "state_forward", "recompute", "backward"} <= kinds
    assert all(v >= 0 for v in stats.seconds.values())
    assert stats.num_instructions == sum(len(step.instructions()) for step in plan)
    assert stats.num_recomputes == sum(1 for step in plan for ins in step.fwd if type(ins).__name__ == "Recompute")
