"""DeepSpeed's ``scheduler`` section under ChunkFlow: ``ds_chunkflow/deepspeed/lr_schedule.py`` and the engine's ``lr``."""

import inspect

import pytest
import torch

from ds_chunkflow.config import ConfigError, split_config
from ds_chunkflow.deepspeed.lr_schedule import WARMUP_PARAMS


def _split(scheduler):
    return split_config({"chunkflow": {"chunk_size": 16}, "scheduler": scheduler})


@pytest.mark.parametrize("scheduler, key", [
    ({"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_num_steps": 20}},
     "scheduler.params.total_num_steps: 10 is less than the warm-up, warmup_num_steps 20"),
    ({"type": "WarmupDecayLR", "params": {"total_num_steps": 500}},
     "scheduler.params.total_num_steps: 500 is less than the warm-up, warmup_num_steps 1000 \\(DeepSpeed's default"),
    ({"type": "WarmupDecayLR", "params": {"warmup_num_steps": 5}}, "scheduler.params.total_num_steps: WarmupDecayLR"),
    ({"type": "WarmupCosineLR", "params": {"total_num_steps": 0}}, "scheduler.params.total_num_steps"),
    ({"type": "WarmupLR", "params": {"warmup_num_steps": 0}}, "scheduler.params.warmup_num_steps"),
    ({"type": "WarmupLR", "params": {"warmup_type": "cosine"}}, "scheduler.params.warmup_type"),
    ({"type": "WarmupLR", "params": {"warmup_steps": 10}}, "scheduler.params.warmup_steps: unknown key"),
    ({"type": "WarmupCosine", "params": {}}, "scheduler.type: unknown schedule 'WarmupCosine'"),
    ({"type": "WarmupLR", "params": [1]}, "scheduler.params: must be a mapping"),
])
def test_bad_schedules_name_the_key(scheduler, key):
    """A schedule that cannot reach its end (total_num_steps below the warm-up, DeepSpeed's default warm-up of
    1000 included), or that DeepSpeed would fail on later, is a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=key):
        _split(scheduler)


@pytest.mark.parametrize("scheduler", [
    None,
    {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
    {"type": "WarmupDecayLR", "params": {"total_num_steps": 10, "warmup_num_steps": 10}},
    {"type": "WarmupCosineLR", "params": {"total_num_steps": 100, "warmup_num_steps": 1}},
    {"type": "OneCycle", "params": {"cycle_min_lr": 0.0, "cycle_max_lr": 0.1}},
    {"type": "CosineAnnealingLR", "params": {"T_max": 10}},
])
def test_good_schedules_pass(scheduler):
    """Schedules that reach their end pass unchanged to DeepSpeed (torch's schedules by name too)."""
    cf, ds = _split(scheduler)
    assert cf is not None and ds.get("scheduler") == scheduler


def test_known_params_are_deepspeeds():
    """The warm-up schedules' keys this check knows are the installed DeepSpeed's constructor parameters."""
    from deepspeed.runtime import lr_schedules

    for kind, params in WARMUP_PARAMS.items():
        signature = inspect.signature(getattr(lr_schedules, kind).__init__)
        assert set(params) == set(signature.parameters) - {"self", "optimizer"}, kind


@pytest.mark.distributed
def test_lr_per_step_matches_plain_deepspeed_across_a_resume(tmp_path):
    """2 ranks, ZeRO-2, K = 2 (several chunk backwards per step): for WarmupLR, WarmupDecayLR and WarmupCosineLR
    the ``lr`` of each step's metrics equals the learning rate a plain ``deepspeed.initialize`` run's optimizer
    applies at that step, bitwise, with a save after step 2 and a fresh engine resuming from it: the schedule
    advances once per global batch and continues where it stopped."""
    from ds_chunkflow.testing.spawn import run_ranks
    from tests.helpers.schedule_workers import compare_schedules

    out = tmp_path / "lrs.pt"
    run_ranks(compare_schedules, str(tmp_path / "ckpt"), str(out), 5, 2)
    for rank in range(2):
        for kind, runs in torch.load(f"{out}.{rank}").items():
            (plain, plain_iter), (chunked, chunked_iter) = runs["plain"], runs["chunkflow"]
            assert chunked == plain, (kind, chunked, plain)
            assert chunked_iter == plain_iter == 4, (kind, chunked_iter, plain_iter)
            assert len(set(plain)) >= 4, (kind, plain)  # the schedule moves: a resume at the wrong step shows
